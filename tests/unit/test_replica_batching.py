"""The replica's batching, without Ray running: ``ModelDeployment.infer`` and its
batch handler on a stand-in engine (``deployments.batcher``, plain asyncio).

What must hold: requests that cannot share an engine call are split into groups; a
group that fails (no context memory, a bug) fails its own requests only; and the
admission deadline is each request's, counted from its arrival, so a request queued
behind a slow or refused call does not wait a second full deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.call_path import CallPath
from deployments.model import ModelDeployment
from engine_runtime.errors import ContextMemoryUnavailable, InputValueError

DEADLINE_S = 0.5


class StandInEngine:
    """Doubles its input; refuses calls whose batch has a row of -1; records deadlines.

    ``on_device``: refuses NaN itself, for the whole batch, as an engine checking on
    the device does (the replica then skips its host pass)."""

    admission_deadline_s = DEADLINE_S

    def __init__(self, call_s: float = 0.0, on_device: bool = False) -> None:
        self.call_s = call_s
        self.checks_finite_on_device = on_device
        self.calls: list[tuple[int, float]] = []  # (batch, deadline given)
        self.finite_checked: list[bool] = []
        self.lock = threading.Lock()

    def infer(self, inputs, *, deadline_s=None, finite_checked=False, inputs_checked=False):
        x = inputs["x"]
        with self.lock:  # one call at a time, as the engine's call lock
            self.calls.append((x.shape[0], deadline_s))
            self.finite_checked.append(finite_checked)
            time.sleep(self.call_s)
            if self.checks_finite_on_device and not np.isfinite(x).all():
                raise InputValueError("x", "contains NaN or infinity")
            if (x == -1).all(axis=1).any():
                raise ContextMemoryUnavailable(123, 45, waited_s=max(deadline_s, 0.0), where="stand-in")
            if (x == -2).all(axis=1).any():
                raise RuntimeError("engine bug")
            return {"y": x * 2}

    def close(self) -> None:  # the replica's __del__ closes its engine
        pass

    def stats(self):
        return SimpleNamespace(context_bytes_held=0)


def replica(engine: StandInEngine, max_batch: int = 4):
    obj = object.__new__(ModelDeployment.func_or_class)
    obj.engine = engine
    obj.desc = SimpleNamespace(max_batch=max_batch)
    obj._validation_key = ("stand-in",)
    obj.model = SimpleNamespace(reject_non_finite=True, name="stand-in")
    obj.call_path = CallPath()
    return obj


@pytest.fixture(autouse=True)
def _outside_a_replica(monkeypatch):
    # Validation against a real description is covered elsewhere; here only batching.
    monkeypatch.setattr("deployments.model.validate_inputs", validate_finite_only)


def rows(value: float, n: int = 1, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, dtype=np.float32)}


# A replica's batcher runs its worker on the event loop of its first call: every test
# runs on this one loop.
LOOP = asyncio.new_event_loop()


def validate_finite_only(desc, inputs, *, reject_non_finite=True):
    """Stands in for validate_inputs: refuses NaN/inf when asked, nothing else."""
    if reject_non_finite and not all(np.isfinite(v).all() for v in inputs.values()):
        raise InputValueError("x", "contains NaN or infinity")
    return {}


@pytest.fixture(autouse=True, scope="module")
def _stop_the_batch_workers():
    """Each replica object's batcher has a worker task on LOOP: stop them before it closes."""
    yield
    tasks = asyncio.all_tasks(LOOP)
    for task in tasks:
        task.cancel()
    LOOP.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    LOOP.close()


def call_all(obj, requests):
    async def gather():
        return await asyncio.gather(*(obj.infer(r) for r in requests), return_exceptions=True)

    return LOOP.run_until_complete(gather())


def test_a_failing_group_fails_only_its_own_requests():
    engine = StandInEngine()
    obj = replica(engine)
    # Three groups in one batch: other per-sample shapes split them.
    requests = [rows(1.0), rows(2.0), rows(-1.0, width=5), rows(-2.0, width=7), rows(3.0)]
    got = call_all(obj, requests)
    assert isinstance(got[2], ContextMemoryUnavailable) and got[2].requested_bytes == 123
    assert isinstance(got[3], RuntimeError) and "engine bug" in str(got[3])
    for i, value in ((0, 1.0), (1, 2.0), (4, 3.0)):
        assert not isinstance(got[i], BaseException), got[i]
        np.testing.assert_array_equal(got[i]["y"], rows(value)["x"] * 2)


def test_the_deadline_runs_from_each_request_s_arrival():
    engine = StandInEngine(call_s=0.3)
    obj = replica(engine)
    # Two groups queued together: the second waits 0.3 s behind the first, and its
    # deadline is what is left of its own 0.5 s, not a fresh 0.5 s.
    call_all(obj, [rows(1.0), rows(1.0, width=5)])
    (b1, d1), (b2, d2) = engine.calls
    assert DEADLINE_S - 0.1 < d1 <= DEADLINE_S
    assert d2 <= DEADLINE_S - 0.25, engine.calls


def test_a_refusal_says_how_long_the_request_waited_in_all():
    engine = StandInEngine(call_s=0.3)
    obj = replica(engine)
    got = call_all(obj, [rows(1.0), rows(-1.0, width=5)])
    err = got[1]
    assert isinstance(err, ContextMemoryUnavailable)
    assert err.waited_s >= 0.3  # queued behind the first call, then refused
    assert isinstance(err.__cause__, ContextMemoryUnavailable)


def test_a_nan_request_fails_alone_where_the_engine_checks_on_the_device():
    engine = StandInEngine(on_device=True)
    obj = replica(engine)
    bad = rows(float("nan"))
    got = call_all(obj, [rows(1.0), bad, rows(2.0)])
    assert isinstance(got[1], InputValueError) and "NaN" in str(got[1])
    np.testing.assert_array_equal(got[0]["y"], rows(1.0)["x"] * 2)
    np.testing.assert_array_equal(got[2]["y"], rows(2.0)["x"] * 2)
    # No host pass on the way in: the merged batch went to the engine, was refused
    # there, and the two good requests ran again without the bad one.
    assert [b for b, _ in engine.calls] == [3, 2] and engine.finite_checked == [False, False]


def test_where_the_engine_checks_on_the_host_the_replica_checks_and_says_so():
    engine = StandInEngine(on_device=False)
    obj = replica(engine)
    got = call_all(obj, [rows(1.0), rows(float("inf")), rows(2.0)])
    assert isinstance(got[1], InputValueError)  # refused on the way in, alone
    assert [b for b, _ in engine.calls] == [2] and engine.finite_checked == [True]


def test_every_call_runs_on_the_replica_s_one_gpu_thread():
    """Before: asyncio's default executor ran each call on whichever of its threads was
    free; every thread that ran eager work kept its own cuBLAS/cuDNN handles."""
    from deployments.replica import gpu_thread

    names: list[str] = []

    class Recording(StandInEngine):
        def infer(self, inputs, **kwargs):
            names.append(threading.current_thread().name)
            return super().infer(inputs, **kwargs)

    obj = replica(Recording(call_s=0.01))
    obj._gpu = gpu_thread("stand-in")
    try:
        got = call_all(obj, [rows(float(i), width=3 + i % 2) for i in range(8)])
        assert not any(isinstance(g, BaseException) for g in got), got
    finally:
        obj._gpu.shutdown()
    assert len(names) >= 2 and set(names) == {names[0]} and names[0].startswith("ebb-gpu-stand-in"), names


def test_the_call_path_splits_each_call_into_its_stages():
    """status()["call_path"]: a request's wait for its batch, the engine call, and the
    replica's whole share; the engine stage is the engine's own time, not the wait."""
    from deployments.replica import gpu_thread

    obj = replica(StandInEngine(call_s=0.02))
    obj._batched.set_max_batch_size(1)
    obj._batched.set_batch_wait_timeout_s(0.0)
    obj._gpu = gpu_thread("stand-in")
    try:
        got = call_all(obj, [rows(1.0), rows(2.0), rows(3.0)])
        assert not any(isinstance(g, BaseException) for g in got), got
    finally:
        obj._gpu.shutdown()
    path = obj.timings(reset=True)
    assert {s: path[s]["count"] for s in path} == {s: 3 for s in
                                                     ("queued", "to_thread", "engine", "from_thread", "replica")}
    assert 18 <= path["engine"]["p50_ms"] < 60, path["engine"]
    # One call at a time: the third request waited behind the two before it.
    assert path["queued"]["p99_ms"] >= 35, path["queued"]
    assert path["replica"]["p99_ms"] >= path["queued"]["p99_ms"] + 18, path
    assert obj.timings() == {}  # reset: the next window starts empty
