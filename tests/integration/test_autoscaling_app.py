"""Memory-aware autoscaling in a running app: scale up under load, never past memory.

BERT-tiny behind ``MemoryAwarePolicy`` with client threads keeping six calls going
against ``target_ongoing_requests: 1``. On a logical GPU sized so that a second replica
cannot fit, the policy holds at one replica and says why (``no_room``, counted on Ray's
metrics endpoint); on a roomy one, the same load adds a replica.

Serve counts ongoing requests at the handle (this process's), and in Ray 2.60 the
handle pushes them to the controller every ``autoscaling_config.metrics_interval_s``
(default 10 s; the ``RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S`` variables set the
replicas' pushes, not the handle's). With a one-second look-back the controller then
saw no requests at all for most of a run although the replica answered ~27 calls/s
(2026-12-07), and the scale-up test passed or timed out by luck. So the handle pushes
every half second here, inside a two-second look-back.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np
import pytest

from engine_runtime.backends.pytorch import PyTorchEngine
from serve_harness import (
    APP_NAME,
    OPS_HTTP_PORT_RANGE,
    application,
    free_port,
    metric_value,
    metrics_options,
    small_args,
    wait_for,
)

#: Ray warns on every validation of a config that sets metrics_interval_s (module docstring).
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
METRICS_PORT = free_port()
RAY_INIT_OPTIONS = metrics_options(METRICS_PORT)
RAY_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
SERVE_HTTP_PORTS = OPS_HTTP_PORT_RANGE
SEQ_LEN = 16
MAX_BATCH = 4
TOKENS = {"input_ids": np.zeros((1, SEQ_LEN), dtype=np.int64)}


def replica_bytes() -> int:
    """Weights plus one largest call's context of the replica, measured here as the replica will."""
    engine = PyTorchEngine.from_architecture("probe", "bert-tiny", max_batch=MAX_BATCH, seq_len=SEQ_LEN,
                                             device="cpu")
    try:
        desc = engine.describe()
        return desc.weights_bytes + engine.context_bytes(desc.max_shapes())
    finally:
        engine.close()


def deploy(serve_instance, *, virtual_gpu_memory_bytes: int, namespace: str) -> None:
    args = small_args(virtual_gpu_memory_bytes=virtual_gpu_memory_bytes, namespace=namespace)
    encoder = next(m for m in args["models"] if m["name"] == "encoder")
    encoder.update(mode="static", pin="static", batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    args["models"] = [encoder]
    options = {
        "max_ongoing_requests": 4,
        "ray_actor_options": {"num_gpus": 0.25, "num_cpus": 0.25},
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            # metrics_interval_s: the handle's push period (module docstring); deprecated
            # in favour of environment variables that do not reach the handle in Ray 2.60.
            "metrics_interval_s": 0.5, "look_back_period_s": 2,
            "upscale_delay_s": 0, "downscale_delay_s": 600,
            "policy": {"policy_function": "deployments.autoscaling:MemoryAwarePolicy",
                       "policy_kwargs": {"namespace": namespace}},
        },
    }
    serve_instance.deploy([application(args, deployments={"encoder": options})], timeout_s=120)


def running_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP_NAME].deployments["encoder"].replica_states
    return int(states.get("RUNNING", 0))


@contextmanager
def load(clients: int = 6):
    """Keep ``clients`` calls in flight until the block ends."""
    from ray import serve

    handle = serve.get_deployment_handle("encoder", app_name=APP_NAME)
    stop = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        while not stop.is_set():
            try:
                handle.infer.remote(TOKENS).result(timeout_s=60)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                errors.append(err)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield errors
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def decisions(reason: str) -> float:
    return metric_value(METRICS_PORT, "ray_ebb_autoscaling_decisions_total", deployment="encoder",
                        reason=reason) or 0.0


def test_no_scale_up_where_no_card_has_room(serve_instance):
    need = replica_bytes()
    # One replica fits under the 90 % high watermark with room to spare, a second does not.
    tiny = math.ceil(1.5 * need / 0.9)
    deploy(serve_instance, virtual_gpu_memory_bytes=tiny, namespace="ebb-autoscale-tiny")
    with load() as errors:
        before = decisions("no_room")
        # Decisions reach Ray's metrics endpoint only as often as the controller pushes
        # them, which is slow on a loaded 2-core CI machine: wait for two, generously.
        wait_for(lambda: decisions("no_room") >= before + 2, 180,
                 "the policy to refuse a scale-up for want of room twice")
        assert running_replicas() == 1
        assert errors == []
    from ray import serve

    serve.delete(APP_NAME)


def test_scale_up_under_load_where_there_is_room(serve_instance):
    deploy(serve_instance, virtual_gpu_memory_bytes=2 * 2**30, namespace="ebb-autoscale")
    assert running_replicas() == 1
    with load() as errors:
        wait_for(lambda: running_replicas() == 2, 90, "a second replica under load")
        assert errors == []
    assert decisions("fits") >= 1
