"""A replica's explicit shutdown and its start's rollback, without Ray: every step
runs even when another fails, twice is once, and a start that fails gives back what
it had got (a joined pool above all: its chunks stay imported otherwise)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments import model as model_mod
from deployments import replica as replica_mod
from deployments.config import parse_app_config
from deployments.gpu_identity import GpuIdentity
from engine_runtime.memory.admission import UnboundedAdmission

MODEL = {"name": "r18", "source": {"architecture": "resnet18"}, "input": {"max_batch": 2, "image_size": 32},
         "device": "cpu", "lazy": True}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []


class FakePool:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def close(self) -> None:
        self.rec.calls.append("pool.close")


class FakeAdmission(UnboundedAdmission):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def close(self) -> None:
        self.rec.calls.append("admission.close")


class FakeClient:
    def __init__(self, rec: Recorder, fail_start: bool = False) -> None:
        self.rec, self.fail_start = rec, fail_start

    def start(self) -> None:
        self.rec.calls.append("client.start")
        if self.fail_start:
            raise RuntimeError("coordinator unreachable (injected)")

    def stop(self) -> None:
        self.rec.calls.append("client.stop")


@pytest.fixture
def replica_env(monkeypatch):
    """ModelDeployment's collaborators replaced: no Ray, no GPU, no shared memory."""
    import deployments.coordinator_client as cc
    from deployments import metrics

    rec = Recorder()
    opts = SimpleNamespace(fail_start=False, fail_make_engine=False)
    monkeypatch.setattr(replica_mod, "current_replica_gpu", lambda: GpuIdentity("cpu-node0", None, True, "node0"))
    monkeypatch.setattr(model_mod.serve, "get_replica_context", lambda: None)
    real_plan = replica_mod.plan_replica_context

    def plan_with_pool(m, a, i):
        _, plan = real_plan(m, a, i)  # the CPU's own plan, with a pool "joined" beside it
        return FakePool(rec), plan

    monkeypatch.setattr(replica_mod, "plan_replica_context", plan_with_pool)
    real_make = model_mod.make_engine

    def make_engine(*args, **kwargs):
        if opts.fail_make_engine:
            raise RuntimeError("engine load failed (injected)")
        return real_make(*args, **kwargs)

    monkeypatch.setattr(model_mod, "make_engine", make_engine)
    monkeypatch.setattr(cc, "admission_for", lambda gpu: FakeAdmission(rec))
    monkeypatch.setattr(cc, "CoordinatorClient", lambda rep, cfg: FakeClient(rec, opts.fail_start))
    monkeypatch.setattr(metrics, "ReplicaMetrics", lambda *a: SimpleNamespace())
    return rec, opts


def make_replica():
    app = parse_app_config({"models": [MODEL]})
    return model_mod.ModelDeployment.func_or_class(app.models[0].model_dump(), app.model_dump())


def test_shutdown_closes_client_engine_pool_in_order_once(replica_env):
    rec, _ = replica_env
    replica = make_replica()
    replica.shutdown()
    assert rec.calls == ["client.start", "client.stop", "pool.close", "admission.close"]
    assert replica.engine.closed
    replica.shutdown()
    replica.__del__()  # Serve's graceful shutdown: the same, idempotent shutdown
    assert rec.calls.count("pool.close") == 1


def test_a_failing_engine_close_does_not_skip_the_pool(replica_env, monkeypatch):
    rec, _ = replica_env
    replica = make_replica()

    def failing_close():
        raise RuntimeError("cuMemUnmap failed (injected)")

    monkeypatch.setattr(replica.engine, "close", failing_close)
    with pytest.raises(RuntimeError, match="injected"):
        replica.shutdown()
    assert rec.calls[-2:] == ["pool.close", "admission.close"]


@pytest.mark.parametrize("where", ["make_engine", "client_start"])
def test_a_failing_start_rolls_back_the_joined_pool(replica_env, where):
    rec, opts = replica_env
    opts.fail_make_engine = where == "make_engine"
    opts.fail_start = where == "client_start"
    with pytest.raises(RuntimeError, match="injected"):
        make_replica()
    assert rec.calls[-2:] == ["pool.close", "admission.close"] and rec.calls.count("pool.close") == 1
    if where == "client_start":
        assert "client.stop" in rec.calls  # a client that may have started is stopped too


def test_release_in_order_runs_every_step_and_raises_the_first_failure():
    from deployments.replica import release_in_order

    ran = []

    def ok(name):
        return lambda: ran.append(name)

    def fails(name):
        def step():
            ran.append(name)
            raise RuntimeError(name)
        return step

    with pytest.raises(RuntimeError, match="engine"):
        release_in_order([ok("client"), fails("engine"), None, fails("pool"), ok("admission")])
    assert ran == ["client", "engine", "pool", "admission"]
    release_in_order([None, ok("again")])
    assert ran[-1] == "again"


# -- a broken engine fails the health check (Serve replaces the replica) ------------------

DEVICE_ASSERT = "CUDA error: device-side assert triggered\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"


def test_a_sticky_cuda_error_fails_the_replica_s_health_check(replica_env, monkeypatch):
    import numpy as np

    from engine_runtime import EngineBrokenError

    replica = make_replica()
    try:
        replica.check_health()
        assert replica.ready()

        def asserting(*args, **kwargs):
            raise RuntimeError(DEVICE_ASSERT)

        monkeypatch.setattr(replica.engine, "_execute_impl", asserting)
        spec = replica.desc.inputs[0]
        x = {spec.name: np.zeros((1, 3, 32, 32), np.float32)}
        with pytest.raises(RuntimeError, match="device-side assert"):
            replica.engine.infer(x)
        with pytest.raises(EngineBrokenError):
            replica.engine.infer(x)
        with pytest.raises(RuntimeError, match=r"engine 'r18' is broken: RuntimeError: CUDA error: device-side"):
            replica.check_health()
        assert not replica.ready()
    finally:
        replica.shutdown()


def test_a_broken_engine_fails_its_group_replica_s_health_check():
    from deployments.group import GroupDeployment

    engines = {"a": SimpleNamespace(closed=False, broken=None), "b": SimpleNamespace(closed=False, broken=None)}
    obj = object.__new__(GroupDeployment.func_or_class)  # no Ray: only what check_health reads
    obj.engines = SimpleNamespace(engine=engines.__getitem__)
    obj.models = dict.fromkeys(engines)
    obj.group = SimpleNamespace(name="zoo")
    obj.gpu = GpuIdentity("cpu-node0", None, True, "node0")
    obj.check_health()
    assert obj.ready()
    engines["b"].broken = "AcceleratorError: CUDA error: device-side assert triggered"
    with pytest.raises(RuntimeError, match=r"group 'zoo': engine\(s\) broken: b: AcceleratorError: CUDA error"):
        obj.check_health()
    assert not obj.ready()



def test_the_start_runs_on_the_replica_s_gpu_thread_and_shutdown_ends_it(replica_env, monkeypatch):
    """Loads and warm-ups (eager cuBLAS/cuDNN: per-thread handles) run on the thread the
    calls will run on (tests/unit/test_replica_batching.py checks the calls)."""
    import threading

    started_on: list[str] = []
    real_setup = replica_mod.setup_cuda_process

    def setup(*args, **kwargs):
        started_on.append(threading.current_thread().name)
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(replica_mod, "setup_cuda_process", setup)
    replica = make_replica()
    try:
        assert len(started_on) == 1 and started_on[0].startswith("ebb-gpu-r18"), started_on
    finally:
        replica.shutdown()
    assert replica._gpu._shutdown
