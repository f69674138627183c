"""The engine lifecycle every backend shares (``BaseEngine``), driven through a tiny backend.

``RecordingEngine`` records every hook call, so the tests can say exactly when the
template loads, acquires, releases and closes. No Ray, no GPU.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch

from engine_runtime import (
    BaseEngine,
    ContextBlock,
    ContextMechanism,
    ContextMemoryUnavailable,
    Engine,
    EngineClosedError,
    EngineDescription,
    MemoryMode,
    ShapeProfile,
    TensorSpec,
)
from engine_runtime.errors import (
    BatchTooLargeError,
    EngineBrokenError,
    InputValueError,
    InvalidInputError,
    UnknownInputError,
    sticky_cuda_error,
)
from engine_runtime.memory import HostAccountingAllocator

FEATURES = 4
MAX_BATCH = 8
#: Context bytes per sample the fake backend claims to need.
PER_SAMPLE_BYTES = 1000

# Wait for conditions with a bound, so a bug fails the test instead of hanging it.
WAIT_S = 10.0


def _wait_for(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.001)


class RecordingEngine(BaseEngine):
    """Doubles its input; ``hook(engine, mode)`` runs inside the call, while context memory is held."""

    def __init__(self, name: str = "rec", hook=None, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.log: list[str] = []
        self.hook = hook
        self.held_during_call: list[int] = []
        self.static_blocks: list[ContextBlock] = []

    def _describe_impl(self) -> EngineDescription:
        return EngineDescription(
            name=self.name,
            inputs=(TensorSpec("x", "float32", (-1, FEATURES)),),
            outputs=(TensorSpec("y", "float32", (-1, FEATURES)),),
            profiles={"x": ShapeProfile((1, FEATURES), (4, FEATURES), (MAX_BATCH, FEATURES))},
            weights_bytes=4096,
            backend="recording",
        )

    def _mechanism_impl(self) -> ContextMechanism:
        return ContextMechanism.HOST_ACCOUNTING

    def _context_bytes_impl(self, shapes):
        return shapes["x"][0] * PER_SAMPLE_BYTES

    def _load_impl(self) -> None:
        self.log.append("load")

    def _execute_impl(self, inputs, shapes, mode):
        self.log.append(f"call-start:{mode.value}")
        if mode is MemoryMode.DYNAMIC:
            with self.dynamic_context(self.context_bytes(shapes), HostAccountingAllocator().allocate):
                out = self._run(inputs, mode)
        else:
            out = self._run(inputs, mode)
        self.log.append(f"call-end:{mode.value}")
        return out

    def _run(self, inputs, mode):
        self.held_during_call.append(self.stats().context_bytes_held)
        if self.hook is not None:
            self.hook(self, mode)
        return {"y": inputs["x"] * 2}

    def _acquire_static_impl(self) -> ContextBlock:
        self.log.append("acquire-static")
        block = ContextBlock(0, MAX_BATCH * PER_SAMPLE_BYTES, lambda b: self.log.append("free-static"))
        self.static_blocks.append(block)
        return block

    def _close_impl(self) -> None:
        self.log.append("close")


class RefusingAdmission:
    """An admission whose budget is spent: every reservation is refused at once."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    @contextlib.contextmanager
    def reserve(self, nbytes, deadline_s):
        self.requests.append(nbytes)
        raise ContextMemoryUnavailable(nbytes, free_bytes=123, waited_s=deadline_s, where="test budget")
        yield  # pragma: no cover - never reached


class _WatchedLock:
    """An RLock that says when a given thread starts waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.waiting: dict[str, threading.Event] = {}

    def __enter__(self):
        event = self.waiting.get(threading.current_thread().name)
        if event is not None:
            event.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def _x(batch: int = 2) -> np.ndarray:
    return np.arange(batch * FEATURES, dtype=np.float32).reshape(batch, FEATURES)


@pytest.fixture
def engine():
    eng = RecordingEngine()
    yield eng
    eng.close()


# -- the interface ------------------------------------------------------------------


def test_is_an_engine(engine):
    assert isinstance(engine, Engine)


# -- lazy initialisation --------------------------------------------------------------


def test_nothing_loads_before_warm(engine):
    engine.describe()
    engine.context_bytes({"x": (2, FEATURES)})
    engine.stats()
    _ = engine.mechanism, engine.mode
    assert engine.log == []
    assert not engine.loaded
    engine.warm()
    engine.warm()
    assert engine.log == ["load"]
    assert engine.loaded


def test_first_call_loads_once(engine):
    engine.infer({"x": _x()})
    engine.infer({"x": _x()})
    assert engine.log.count("load") == 1


def test_invalid_input_does_not_load(engine):
    with pytest.raises(UnknownInputError):
        engine.infer({"nope": _x()})
    assert engine.log == []
    assert engine.stats().calls_invalid == 1


def test_concurrent_first_calls_load_once(engine):
    barrier = threading.Barrier(8)

    def call():
        barrier.wait(WAIT_S)
        engine.infer({"x": _x()})

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert engine.log.count("load") == 1
    assert engine.stats().calls_ok == 8


def test_set_mode_before_load_does_not_load(engine):
    engine.set_mode("static")
    assert engine.log == []
    engine.warm()
    assert engine.log == ["load", "acquire-static"]


# -- modes ------------------------------------------------------------------------------


def test_unknown_mode_is_refused_and_the_mode_kept(engine):
    with pytest.raises(ValueError, match="expected one of \\['static', 'dynamic'\\]"):
        engine.set_mode("fast")
    assert engine.mode is MemoryMode.DYNAMIC
    with pytest.raises(ValueError, match="'fast'"):
        RecordingEngine(mode="fast")


def test_set_mode_returns_the_previous_mode(engine):
    assert engine.set_mode("static") is MemoryMode.DYNAMIC
    assert engine.set_mode(MemoryMode.STATIC) is MemoryMode.STATIC
    assert engine.set_mode("DYNAMIC") is MemoryMode.STATIC


@pytest.mark.parametrize("start, inner", [(MemoryMode.DYNAMIC, MemoryMode.STATIC), (MemoryMode.STATIC, MemoryMode.DYNAMIC)])
def test_using_mode_restores_the_previous_mode(start, inner):
    engine = RecordingEngine(mode=start)
    try:
        engine.warm()
        with engine.using_mode(inner) as current:
            assert current is inner
            assert engine.mode is inner
            engine.infer({"x": _x()})
        assert engine.mode is start
        assert engine.stats().latency_p50_s.keys() == {inner.value}
    finally:
        engine.close()


def test_using_mode_restores_when_the_block_raises(engine):
    engine.warm()
    with pytest.raises(RuntimeError, match="boom"):
        with engine.using_mode("static"):
            raise RuntimeError("boom")
    assert engine.mode is MemoryMode.DYNAMIC
    assert engine.stats().context_bytes_held == 0, "static memory taken by the block was given back"


def test_using_mode_nested(engine):
    engine.warm()
    with engine.using_mode("static"):
        with engine.using_mode("dynamic"):
            assert engine.mode is MemoryMode.DYNAMIC
            with engine.using_mode("static"):
                assert engine.mode is MemoryMode.STATIC
            assert engine.mode is MemoryMode.DYNAMIC
        assert engine.mode is MemoryMode.STATIC
    assert engine.mode is MemoryMode.DYNAMIC


def test_using_mode_same_mode_is_a_no_op(engine):
    with engine.using_mode("dynamic"):
        assert engine.mode is MemoryMode.DYNAMIC
    assert engine.mode is MemoryMode.DYNAMIC
    assert engine.log == []


def test_mode_switch_waits_for_the_call_in_flight():
    in_call = threading.Event()
    finish_call = threading.Event()

    def hook(eng, mode):
        in_call.set()
        assert finish_call.wait(WAIT_S), "test never released the call"

    engine = RecordingEngine(hook=hook)
    lock = _WatchedLock()
    engine._call_lock = lock  # observe the switcher arriving at the lock the call holds
    switcher_waiting = threading.Event()
    lock.waiting["switcher"] = switcher_waiting
    results: dict[str, object] = {}

    def call():
        results["y"] = engine.infer({"x": _x(3)})["y"]

    def switch():
        results["previous"] = engine.set_mode("static")

    caller = threading.Thread(target=call, name="caller")
    switcher = threading.Thread(target=switch, name="switcher")
    try:
        caller.start()
        assert in_call.wait(WAIT_S)
        switcher.start()
        assert switcher_waiting.wait(WAIT_S), "switcher never reached the call lock"
        assert engine.mode is MemoryMode.DYNAMIC, "mode changed while a call was in flight"
        assert "acquire-static" not in engine.log
        finish_call.set()
        caller.join(WAIT_S)
        switcher.join(WAIT_S)
        assert not caller.is_alive() and not switcher.is_alive()

        np.testing.assert_array_equal(results["y"], _x(3) * 2)
        assert results["previous"] is MemoryMode.DYNAMIC
        assert engine.mode is MemoryMode.STATIC
        assert engine.log == ["load", "call-start:dynamic", "call-end:dynamic", "acquire-static"]
        assert engine.held_during_call == [3 * PER_SAMPLE_BYTES], "the call kept its dynamic memory to the end"
        assert engine.stats().context_bytes_held == MAX_BATCH * PER_SAMPLE_BYTES
    finally:
        finish_call.set()
        engine.close()


def test_switching_modes_under_calls_from_many_threads(engine):
    stop = threading.Event()
    called = threading.Event()
    errors: list[BaseException] = []

    def caller():
        while not stop.is_set():
            try:
                out = engine.infer({"x": _x(4)})
                np.testing.assert_array_equal(out["y"], _x(4) * 2)
                called.set()
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)
                called.set()
                return

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(100):
            # Each switch lands between calls that really ran, in both directions.
            assert called.wait(WAIT_S), "no call completed"
            called.clear()
            engine.set_mode("static" if i % 2 == 0 else "dynamic")
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
    assert not errors, errors
    snap = engine.stats()
    assert snap.calls_ok >= 100
    assert snap.calls_failed == 0 and snap.calls_in_flight == 0
    assert set(snap.latency_p50_s) == {"static", "dynamic"}
    assert engine.mode is MemoryMode.DYNAMIC
    assert snap.context_bytes_held == 0
    assert all(block.released for block in engine.static_blocks)


# -- context memory -----------------------------------------------------------------------


def test_dynamic_holds_context_only_during_calls(engine):
    engine.warm()
    assert engine.stats().context_bytes_held == 0
    for batch in (1, 5, 8):
        engine.infer({"x": _x(batch)})
        assert engine.stats().context_bytes_held == 0
    assert engine.held_during_call == [PER_SAMPLE_BYTES, 5 * PER_SAMPLE_BYTES, 8 * PER_SAMPLE_BYTES]
    snap = engine.stats()
    assert snap.acquisitions == 3
    assert snap.peak_context_bytes == snap.last_context_bytes == 8 * PER_SAMPLE_BYTES
    # The figures are the three acquisitions' own: their sum and their median.
    count, durations = engine.acquisition_durations_since(0)
    assert count == 3 and len(durations) == 3
    assert snap.acquisition_total_s == pytest.approx(sum(durations))
    assert snap.acquisition_p50_s == pytest.approx(sorted(durations)[1])


def test_dynamic_releases_when_the_call_fails():
    def hook(eng, mode):
        raise RuntimeError("kernel failed")

    engine = RecordingEngine(hook=hook)
    try:
        with pytest.raises(RuntimeError, match="kernel failed"):
            engine.infer({"x": _x()})
        snap = engine.stats()
        assert snap.context_bytes_held == 0
        assert snap.calls_failed == 1 and snap.calls_in_flight == 0
    finally:
        engine.close()


def test_static_holds_between_calls():
    engine = RecordingEngine(mode="static")
    try:
        engine.warm()
        held = MAX_BATCH * PER_SAMPLE_BYTES
        assert engine.stats().context_bytes_held == held
        for _ in range(3):
            engine.infer({"x": _x()})
            assert engine.stats().context_bytes_held == held
        assert engine.held_during_call == [held] * 3
        assert engine.log.count("acquire-static") == 1
        engine.set_mode("dynamic")
        assert engine.stats().context_bytes_held == 0
        assert engine.log[-1] == "free-static"
    finally:
        engine.close()


def test_weights_bytes_are_accounted_after_load(engine):
    assert engine.stats().weights_bytes == 0
    engine.warm()
    assert engine.stats().weights_bytes == 4096


# -- admission ---------------------------------------------------------------------------


class DeadlineRecordingAdmission:
    """Admits every reservation and records the deadline each was given."""

    def __init__(self) -> None:
        self.deadlines: list[float] = []

    @contextlib.contextmanager
    def reserve(self, nbytes, deadline_s):
        self.deadlines.append(deadline_s)
        yield


def test_a_call_s_deadline_bounds_its_wait_including_behind_a_call_in_flight():
    admission = DeadlineRecordingAdmission()
    engine = RecordingEngine(admission=admission, admission_deadline_s=5.0)
    try:
        engine.infer({"x": _x(2)})
        assert 4.9 < admission.deadlines[-1] <= 5.0  # the engine's own by default
        engine.infer({"x": _x(2)}, deadline_s=0.3)
        assert 0.2 < admission.deadlines[-1] <= 0.3
        engine.infer({"x": _x(2)}, deadline_s=-1.0)  # already past: one try, no wait
        assert admission.deadlines[-1] == 0.0
        # Waiting for the call lock (a call in flight) counts against the deadline.
        with engine._call_lock:
            done = threading.Event()
            worker = threading.Thread(target=lambda: (engine.infer({"x": _x(2)}, deadline_s=0.5), done.set()))
            worker.start()
            # The worker's deadline runs from before it counted itself in flight.
            _wait_for(lambda: engine.stats().calls_in_flight == 1, "the worker to wait for the call lock")
            seen_waiting = time.monotonic()
            _wait_for(lambda: time.monotonic() - seen_waiting >= 0.2, "0.2 s held")
            released = time.monotonic()
        worker.join(WAIT_S)
        # Whatever the scheduling, the wait behind the lock came off the 0.5 s.
        assert done.is_set() and admission.deadlines[-1] <= 0.5 - (released - seen_waiting)
        assert engine.call_deadline_s == 5.0  # outside a call: the engine's deadline
    finally:
        engine.close()


class OrderRecordingAdmission:
    """Admits every reservation and records its entry and its exit (with the error it saw)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    @contextlib.contextmanager
    def reserve(self, nbytes, deadline_s):
        self.log.append("admitted")
        try:
            yield
        except BaseException as err:
            self.log.append(f"admission left on {type(err).__name__}")
            raise
        self.log.append("admission left")


@pytest.mark.parametrize("fail_at", [None, "allocate", "call", "release", "call+release"])
def test_dynamic_context_releases_memory_then_admission_whatever_fails(fail_at):
    log: list[str] = []

    class AllocateFailed(Exception):
        pass

    class CallFailed(Exception):
        pass

    class ReleaseFailed(Exception):
        pass

    def release(block):
        log.append("released")
        if fail_at is not None and "release" in fail_at:
            raise ReleaseFailed

    def allocate(nbytes):
        if fail_at == "allocate":
            raise AllocateFailed
        log.append("allocated")
        return ContextBlock(0, nbytes, release)

    engine = RecordingEngine(admission=OrderRecordingAdmission(log))
    try:
        raised = None
        try:
            with engine.dynamic_context(64, allocate) as block:
                assert block.nbytes == 64 and engine.stats().context_bytes_held == 64
                log.append("ran")
                if fail_at is not None and "call" in fail_at:
                    raise CallFailed
        except (AllocateFailed, CallFailed, ReleaseFailed) as err:
            raised = type(err).__name__
        expected = {
            None: (None, ["admitted", "allocated", "ran", "released", "admission left"]),
            "allocate": ("AllocateFailed", ["admitted", "admission left on AllocateFailed"]),
            "call": ("CallFailed", ["admitted", "allocated", "ran", "released", "admission left on CallFailed"]),
            "release": ("ReleaseFailed", ["admitted", "allocated", "ran", "released",
                                          "admission left on ReleaseFailed"]),
            # The release's error wins, as a ``finally`` that raises does.
            "call+release": ("ReleaseFailed", ["admitted", "allocated", "ran", "released",
                                               "admission left on ReleaseFailed"]),
        }[fail_at]
        assert (raised, log) == expected
        assert engine.stats().context_bytes_held == 0
    finally:
        engine.close()


def test_refused_admission_propagates_and_is_counted():
    admission = RefusingAdmission()
    engine = RecordingEngine(admission=admission, admission_deadline_s=0.25)
    try:
        with pytest.raises(ContextMemoryUnavailable) as info:
            engine.infer({"x": _x(3)})
        err = info.value
        # The fake reports the deadline it was given: what was left of the call's 0.25 s.
        assert (err.requested_bytes, err.free_bytes) == (3 * PER_SAMPLE_BYTES, 123)
        assert 0.2 < err.waited_s <= 0.25
        assert "requested" in str(err) and "free" in str(err) and "test budget" in str(err)
        assert admission.requests == [3 * PER_SAMPLE_BYTES]
        snap = engine.stats()
        assert (snap.calls_unavailable, snap.calls_failed, snap.calls_ok) == (1, 0, 0)
        assert snap.context_bytes_held == 0 and snap.acquisitions == 0
        assert "call-end:dynamic" not in engine.log
        # Static mode takes no per-call admission: the same engine serves.
        engine.set_mode("static")
        np.testing.assert_array_equal(engine.infer({"x": _x(3)})["y"], _x(3) * 2)
    finally:
        engine.close()


# -- close -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MemoryMode))
def test_close_releases_everything_and_is_idempotent(mode):
    engine = RecordingEngine(mode=mode)
    engine.infer({"x": _x()})
    engine.close()
    engine.close()
    assert engine.closed and not engine.loaded
    assert engine.log.count("close") == 1
    assert engine.stats().context_bytes_held == 0
    assert all(block.released for block in engine.static_blocks)
    if mode is MemoryMode.STATIC:
        assert engine.log[-2:] == ["free-static", "close"]


def test_close_before_load_touches_nothing():
    engine = RecordingEngine()
    engine.close()
    assert engine.log == []
    with pytest.raises(EngineClosedError):
        engine.warm()
    assert engine.log == []


def test_calls_after_close_raise(engine):
    engine.infer({"x": _x()})
    engine.close()
    with pytest.raises(EngineClosedError, match="'rec' is closed"):
        engine.infer({"x": _x()})
    with pytest.raises(EngineClosedError):
        engine.set_mode("static")
    with pytest.raises(EngineClosedError):
        with engine.using_mode("static"):
            pass


def test_close_inside_using_mode_does_not_reopen(engine):
    engine.warm()
    with engine.using_mode("static"):
        engine.close()
    assert engine.closed
    assert engine.stats().context_bytes_held == 0


def test_close_waits_for_a_load_in_progress():
    loading = threading.Event()
    finish_load = threading.Event()

    class SlowLoad(RecordingEngine):
        def _load_impl(self) -> None:
            loading.set()
            assert finish_load.wait(WAIT_S)
            super()._load_impl()

    engine = SlowLoad(mode="static")
    lock = _WatchedLock()
    engine._call_lock = lock
    closer_at_lock = threading.Event()
    lock.waiting["closer"] = closer_at_lock
    loader = threading.Thread(target=engine.warm, name="loader")
    closer = threading.Thread(target=engine.close, name="closer")
    try:
        loader.start()
        assert loading.wait(WAIT_S)
        closer.start()
        assert closer_at_lock.wait(WAIT_S)
        finish_load.set()
        loader.join(WAIT_S)
        closer.join(WAIT_S)
    finally:
        finish_load.set()
    assert engine.log == ["load", "acquire-static", "free-static", "close"]
    assert engine.stats().context_bytes_held == 0


# -- tensors in, tensors out ---------------------------------------------------------------


def test_numpy_in_numpy_out(engine):
    out = engine.infer({"x": _x()})["y"]
    assert isinstance(out, np.ndarray)


def test_torch_in_torch_out(engine):
    out = engine.infer({"x": torch.from_numpy(_x())})["y"]
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.from_numpy(_x()) * 2)


def test_batch_over_profile_is_refused_before_loading(engine):
    with pytest.raises(BatchTooLargeError) as info:
        engine.infer({"x": _x(MAX_BATCH + 1)})
    assert info.value.max_batch == MAX_BATCH
    assert engine.log == []


def test_finite_checked_skips_only_the_engine_s_host_pass_over_values():
    engine = RecordingEngine()
    try:
        x = _x(2)
        x[0, 0] = np.nan
        with pytest.raises(InputValueError, match="NaN"):
            engine.infer({"x": x})
        # The caller says it already refused NaN/inf: no second pass (here it lied, and
        # the NaN goes through, which is what a skipped check means).
        assert np.isnan(engine.infer({"x": x}, finite_checked=True)["y"][0, 0])
        # Shapes are still checked.
        with pytest.raises(InvalidInputError):
            engine.infer({"x": np.zeros((2, 99), np.float32)}, finite_checked=True)
    finally:
        engine.close()


# -- sticky CUDA errors ------------------------------------------------------------------

#: As PyTorch raised it on an H200 when BERT's embedding got an out-of-range id.
DEVICE_ASSERT = ("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported "
                 "at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
                 "passing CUDA_LAUNCH_BLOCKING=1")


def _cuda_error(call: str, name: str, code: int):
    """An ``engine_runtime._cuda.CudaError`` as the wrappers raise it (no cuda-python here)."""
    import enum

    from engine_runtime._cuda import CudaError

    return CudaError(call, enum.IntEnum("cudaError_t", {name: code})[name])


STICKY = [
    lambda: torch.AcceleratorError(DEVICE_ASSERT),
    lambda: RuntimeError(DEVICE_ASSERT),
    lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    lambda: RuntimeError("CUDA error: unspecified launch failure"),
    lambda: _cuda_error("cudaMemGetInfo", "cudaErrorAssert", 710),
    lambda: _cuda_error("cuMemUnmap", "CUDA_ERROR_ILLEGAL_ADDRESS", 700),
]
STICKY_IDS = ["accelerator-assert", "runtime-assert", "illegal-address", "launch-failure", "cudaErrorAssert",
              "CUDA_ERROR_ILLEGAL_ADDRESS"]


class _RaisesOnce:
    """A hook raising ``error`` on its first call only; counts the calls that ran."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.ran = error, 0

    def __call__(self, eng, mode) -> None:
        self.ran += 1
        if self.ran == 1:
            raise self.error


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("make_error", STICKY, ids=STICKY_IDS)
def test_a_sticky_cuda_error_breaks_the_engine_and_every_later_call_is_refused(make_error, mode):
    error = make_error()
    hook = _RaisesOnce(error)
    engine = RecordingEngine(name="bert", hook=hook, mode=mode)
    try:
        assert engine.broken is None
        with pytest.raises(type(error)) as first:
            engine.infer({"x": _x()})
        assert first.value is error  # the call that met it raises it as it is (a bug: 500)
        assert engine.broken is not None and str(error).splitlines()[0] in engine.broken
        assert type(error).__name__ in engine.broken
        assert "CUDA_LAUNCH_BLOCKING" not in engine.broken  # PyTorch's advice lines are dropped
        for _ in range(2):
            with pytest.raises(EngineBrokenError) as later:
                engine.infer({"x": _x()})
            assert later.value.engine == "bert" and later.value.cause == engine.broken
            assert "'bert'" in str(later.value) and engine.broken in str(later.value)
        assert hook.ran == 1, "a broken engine ran a call"
        assert engine.stats().context_bytes_held == (0 if mode == "dynamic" else MAX_BATCH * PER_SAMPLE_BYTES)
        assert engine.stats().calls_failed == 1
    finally:
        engine.close()


def test_the_first_sticky_error_is_the_one_kept():
    engine = RecordingEngine(hook=lambda e, mode: None)
    try:
        engine._note_sticky(RuntimeError("CUDA error: device-side assert triggered"))
        engine._note_sticky(RuntimeError("CUDA error: unspecified launch failure"))
        assert "device-side assert" in engine.broken and "launch failure" not in engine.broken
    finally:
        engine.close()


def test_a_call_waiting_behind_the_one_that_broke_the_engine_is_refused():
    in_call, finish_call = threading.Event(), threading.Event()

    def hook(eng, mode):
        in_call.set()
        assert finish_call.wait(WAIT_S), "test never released the call"
        raise RuntimeError(DEVICE_ASSERT)

    engine = RecordingEngine(hook=hook)
    lock = _WatchedLock()
    engine._call_lock = lock
    second_waiting = threading.Event()
    lock.waiting["second"] = second_waiting
    results: dict[str, BaseException] = {}

    def call(name):
        try:
            engine.infer({"x": _x()})
        except BaseException as err:  # noqa: BLE001 - kept for the assertions
            results[name] = err

    first = threading.Thread(target=call, args=("first",), name="first")
    second = threading.Thread(target=call, args=("second",), name="second")
    try:
        first.start()
        assert in_call.wait(WAIT_S)
        second.start()
        assert second_waiting.wait(WAIT_S), "the second call never reached the call lock"
        finish_call.set()
        first.join(WAIT_S)
        second.join(WAIT_S)
        assert isinstance(results["first"], RuntimeError) and not isinstance(results["first"], EngineBrokenError)
        assert isinstance(results["second"], EngineBrokenError)
        assert engine.log.count("call-start:dynamic") == 1
    finally:
        finish_call.set()
        engine.close()


@pytest.mark.parametrize("make_error", [
    lambda: ValueError("bad value"),
    lambda: RuntimeError("shape mismatch in matmul"),
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    lambda: RuntimeError("CUDA error: out of memory"),
    lambda: _cuda_error("cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY", 2),
    lambda: ContextMemoryUnavailable(1, 0, where="test"),
], ids=["value-error", "runtime-error", "torch-oom", "cuda-oom", "cuda-error-oom", "unavailable"])
def test_other_errors_do_not_break_the_engine(make_error):
    hook = _RaisesOnce(make_error())
    engine = RecordingEngine(hook=hook)
    try:
        with pytest.raises(Exception):  # noqa: B017 - each its own: raised, or 503 for memory
            engine.infer({"x": _x()})
        assert engine.broken is None
        np.testing.assert_array_equal(engine.infer({"x": _x()})["y"], _x() * 2)
        assert hook.ran == 2
    finally:
        engine.close()


def test_a_sticky_error_under_a_memory_refusal_still_breaks_the_engine():
    def hook(eng, mode):
        try:
            raise _cuda_error("cuMemUnmap", "CUDA_ERROR_LAUNCH_FAILED", 719)
        except Exception as err:
            raise ContextMemoryUnavailable(1, 0, where="test") from err

    engine = RecordingEngine(hook=hook)
    try:
        with pytest.raises(ContextMemoryUnavailable):
            engine.infer({"x": _x()})
        assert "CUDA_ERROR_LAUNCH_FAILED" in engine.broken
        with pytest.raises(EngineBrokenError):
            engine.infer({"x": _x()})
    finally:
        engine.close()


@pytest.mark.parametrize(("exc", "sticky"), [
    *[(make(), True) for make in STICKY],
    (RuntimeError("CUDA error: misaligned address"), True),
    (RuntimeError("CUDA error: the launch timed out and was terminated"), True),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("expected scalar type Float"), False),
    (ValueError("CUDA error: device-side assert triggered"), False),  # only the types CUDA's errors come as
    (EngineBrokenError("bert", "RuntimeError: CUDA error: device-side assert triggered"), False),
])
def test_sticky_cuda_error_table(exc, sticky):
    assert (sticky_cuda_error(exc) is exc) is sticky


def test_a_sticky_error_is_found_under_the_errors_raised_from_it():
    from engine_runtime.errors import EngineLoadError

    asserted = RuntimeError(DEVICE_ASSERT)
    try:
        try:
            raise asserted
        except RuntimeError as err:
            raise EngineLoadError(f"running the model failed: {type(err).__name__}") from err
    except EngineLoadError as wrapped:
        assert sticky_cuda_error(wrapped) is asserted


def test_engine_broken_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(EngineBrokenError("bert", "AcceleratorError: CUDA error: device-side assert")))
    assert (err.engine, err.cause) == ("bert", "AcceleratorError: CUDA error: device-side assert")
    assert "'bert'" in str(err)


def test_time_calls_warms_up_then_times_each_call_alone():
    """The one timing method of bench_modes and the GPU tests: warm-up calls are not
    timed, every timed call is, and the figures come from those samples only."""
    from engine_runtime.stats import time_calls

    seen = []
    durations = iter([0.0] * 3 + [0.001] * 9 + [0.005])

    clock = [0.0]

    def call():
        seen.append(len(seen))
        clock[0] += next(durations)

    import engine_runtime.stats as stats_module

    real = stats_module.time.perf_counter
    stats_module.time.perf_counter = lambda: clock[0]
    try:
        t = time_calls(call, calls=10, warmup=3)
    finally:
        stats_module.time.perf_counter = real
    assert len(seen) == 13 and t.calls == 10 and t.warmup == 3 and len(t.samples_s) == 10
    assert t.p50_s == pytest.approx(0.001) and t.p99_s == pytest.approx(0.005)
    assert t.mean_s == pytest.approx((9 * 0.001 + 0.005) / 10)
    with pytest.raises(ValueError, match="calls >= 1"):
        time_calls(call, calls=0)
