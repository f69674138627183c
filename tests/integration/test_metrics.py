"""Ebb's metrics, read back from Ray's Prometheus endpoint of a running app.

One BERT-tiny replica, static, on one logical GPU. Calls move the replica's call
counters and acquisitions; the coordinator publishes the GPU's memory and pressure;
bytes injected on the (virtual) GPU make it decide a switch to dynamic and leave the
admission budget no room, so the next call is refused: a decision by reason and an
admission rejection appear.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray

from deployments.coordinator import get_existing
from serve_harness import (
    APP_NAME,
    OPS_HTTP_PORT_RANGE,
    application,
    free_port,
    metric_value,
    metrics_options,
    model_deployment_options,
    small_args,
    wait_for,
)
from engine_runtime.units import GiB

METRICS_PORT = free_port()
RAY_INIT_OPTIONS = metrics_options(METRICS_PORT)
SERVE_HTTP_PORTS = OPS_HTTP_PORT_RANGE
SEQ_LEN = 16


def _args() -> dict:
    args = small_args(virtual_gpu_memory_bytes=2 * GiB)
    encoder = next(m for m in args["models"] if m["name"] == "encoder")
    encoder.update(mode="static", pin="auto")
    args["models"] = [encoder]
    return args


@pytest.fixture(scope="module")
def app(serve_instance):
    serve_instance.deploy([application(_args(), deployments={"encoder": model_deployment_options()})],
                          timeout_s=120)
    from ray import serve

    return serve.get_deployment_handle("encoder", app_name=APP_NAME)


def tokens(batch: int = 2) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(0).integers(0, 1000, (batch, SEQ_LEN), dtype=np.int64)}


def metric(name: str, **labels: str) -> float | None:
    return metric_value(METRICS_PORT, name, **labels)


def test_replica_metrics_follow_its_calls(app):
    for _ in range(5):
        app.infer.remote(tokens()).result(timeout_s=60)
    wait_for(lambda: (metric("ray_ebb_replica_calls_total", model="encoder", outcome="ok") or 0) >= 5, 30,
             "5 ok calls counted")
    assert metric("ray_ebb_replica_mode", model="encoder", mode="static") == 1
    assert metric("ray_ebb_replica_mode", model="encoder", mode="dynamic") == 0
    # Static: the replica holds its context block, acquired once.
    assert metric("ray_ebb_replica_context_bytes_held", model="encoder") > 0
    assert metric("ray_ebb_replica_weights_bytes", model="encoder") > 1 << 20
    assert metric("ray_ebb_replica_context_acquisitions_total", model="encoder") >= 1
    assert metric("ray_ebb_replica_context_acquisition_seconds_count", model="encoder") >= 1


def test_gpu_memory_and_pressure_from_the_coordinator(app):
    total = wait_for(lambda: metric("ray_ebb_gpu_total_bytes"), 30, "the GPU's total bytes")
    assert total == 2 * GiB
    used = metric("ray_ebb_gpu_used_bytes")
    assert 1 << 20 < used < total
    assert metric("ray_ebb_gpu_pressure") == pytest.approx(used / total)


def test_decisions_by_reason_and_rejections_under_pressure(app):
    coordinator = get_existing()
    gpu = ray.get(coordinator.status.remote())["gpus"][0]["gpu"]
    ray.get(coordinator.inject_external_bytes.remote(gpu, 2 * GiB))
    try:
        wait_for(lambda: metric("ray_ebb_replica_mode", model="encoder", mode="dynamic") == 1, 30,
                 "the replica to be moved to dynamic")
        # The coordinator and the replica are two workers, each exporting on its own
        # report interval: the counter may show up a moment after the mode it ordered.
        decisions = wait_for(lambda: metric("ray_ebb_coordinator_decisions_total"), 10,
                             "the coordinator's decision counted")
        assert decisions >= 1

        def refused() -> bool:
            try:
                app.infer.remote(tokens()).result(timeout_s=60)
            except Exception as err:  # noqa: BLE001 - Serve re-raises the replica's error
                return "context memory unavailable" in str(err)
            return False

        wait_for(refused, 30, "a call refused for want of context memory", interval_s=0.3)
        wait_for(lambda: (metric("ray_ebb_replica_admission_rejections_total", model="encoder") or 0) >= 1, 30,
                 "the rejection counted")
        assert metric("ray_ebb_replica_calls_total", model="encoder", outcome="unavailable") >= 1
        assert metric("ray_ebb_gpu_pressure") > 1.0
    finally:
        ray.get(coordinator.inject_external_bytes.remote(gpu, 0))
