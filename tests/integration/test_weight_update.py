"""New weights through ``user_config`` under traffic: no failed call, answers switch.

One BERT-tiny replica serves a steady stream of the same request from a client
thread while the deployment's ``user_config`` gains ``weights``; Serve reconfigures
the running replica (no restart). Every answer must equal the old weights' or the
new weights' answer, none may fail, and once the new answer appears the old one
must not come back. Then the same with a state dict file inside ``model_dirs``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from engine_runtime.backends.pytorch import PyTorchEngine
from engine_runtime.architectures import build
from serve_harness import APP_NAME, OPS_HTTP_PORT_RANGE, application, model_deployment_options, small_args, wait_for

SERVE_HTTP_PORTS = OPS_HTTP_PORT_RANGE
SEQ_LEN = 16
TOKENS = {"input_ids": np.random.default_rng(3).integers(0, 1000, (2, SEQ_LEN), dtype=np.int64)}
USER_CONFIG = {"mode": "dynamic", "max_batch_size": 4, "batch_wait_timeout_s": 0.01}


def expected(seed: int) -> np.ndarray:
    """The answer of BERT-tiny with the given seed's weights, computed here on the CPU."""
    engine = PyTorchEngine.from_architecture("ref", "bert-tiny", max_batch=4, seq_len=SEQ_LEN, seed=seed,
                                             device="cpu")
    try:
        return engine.infer(TOKENS)["output"]
    finally:
        engine.close()


@dataclass
class Traffic:
    """Calls the replica back to back from a thread, keeping every answer and error in order."""

    handle: object
    answers: list[np.ndarray] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.answers.append(self.handle.infer.remote(TOKENS).result(timeout_s=60)["output"])
            except BaseException as err:  # noqa: BLE001 - every failure is a test failure
                self.errors.append(err)

    def __enter__(self) -> Traffic:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def deploy(serve_instance, model_dir):
    args = small_args()
    args["models"] = [m for m in args["models"] if m["name"] == "encoder"]
    args["model_dirs"] = [str(model_dir)]

    def deploy_with(user_config: dict) -> None:
        serve_instance.deploy([application(args, deployments={"encoder": model_deployment_options(user_config)})],
                              timeout_s=120)

    deploy_with(USER_CONFIG)
    return deploy_with


@pytest.fixture(scope="module")
def handle(deploy):
    from ray import serve

    return serve.get_deployment_handle("encoder", app_name=APP_NAME)


def switch_under_traffic(deploy, handle, user_config: dict, old: np.ndarray, new: np.ndarray) -> None:
    replica_before = handle.status.remote().result(timeout_s=30)["replica_id"]
    with Traffic(handle) as traffic:
        wait_for(lambda: len(traffic.answers) >= 3, 60, "traffic before the update")
        deploy(user_config)
        wait_for(lambda: np.allclose(traffic.answers[-1], new, atol=1e-5), 60, "answers from the new weights")
        seen = len(traffic.answers)
        wait_for(lambda: len(traffic.answers) >= seen + 3, 60, "traffic after the update")
    assert traffic.errors == []
    kinds = []
    for answer in traffic.answers:
        if np.allclose(answer, old, atol=1e-5):
            kinds.append("old")
        elif np.allclose(answer, new, atol=1e-5):
            kinds.append("new")
        else:
            pytest.fail(f"an answer matches neither the old nor the new weights: {answer.ravel()[:4]}")
    first_new = kinds.index("new")
    assert "old" in kinds[:first_new] and "old" not in kinds[first_new:], kinds
    # Reconfigured in place: the same replica answers, with the new version.
    status = handle.status.remote().result(timeout_s=30)
    assert status["replica_id"] == replica_before


def test_new_seed_applied_under_traffic_without_a_failed_call(deploy, handle):
    old, new = expected(0), expected(1)
    assert not np.allclose(old, new)
    switch_under_traffic(deploy, handle, {**USER_CONFIG, "weights": {"seed": 1}}, old, new)
    assert handle.status.remote().result(timeout_s=30)["weights_version"] == "seed-1"


def test_state_dict_file_applied_under_traffic(deploy, handle, model_dir):
    torch.save(build("bert-tiny", seed=2, seq_len=SEQ_LEN).module.state_dict(), model_dir / "encoder-v2.pt")
    switch_under_traffic(deploy, handle, {**USER_CONFIG, "weights": {"path": "encoder-v2.pt", "version": "v2"}},
                         expected(1), expected(2))
    assert handle.status.remote().result(timeout_s=30)["weights_version"] == "v2"
