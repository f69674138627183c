"""SharedBudget across real processes on shared memory: the budget is never exceeded,
deadlines fail with the numbers, dead holders are reclaimed, shrinking is safe, and a
large request is not starved. Workers are spawned (not forked), like Ray workers."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid

import pytest

from engine_runtime.memory.admission import Admission, SharedBudget, UnboundedAdmission, budget_path
from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError
from engine_runtime.units import MiB

CTX = mp.get_context("spawn")


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def key():
    k = f"test-{uuid.uuid4().hex[:12]}"
    yield k
    path = budget_path(k)
    if os.path.exists(path):
        os.unlink(path)


# -- workers (module level so spawn can import them) ---------------------------------


def _hammer(key, sizes, deadline_s, held, peak, lock, outcomes, start, together=None):
    """Reserve each size in turn; inside the block add to the shared ``held`` counter.

    With ``together`` (a barrier), the first reservation is held until every worker
    holds its own, so the workers are known to overlap however the machine schedules them.
    """
    budget = SharedBudget(key)
    start.wait()
    if together is not None:
        with budget.reserve(OVERLAP_BYTES, deadline_s):
            with lock:
                held.value += OVERLAP_BYTES
                peak.value = max(peak.value, held.value)
            together.wait(timeout=30)
            with lock:
                held.value -= OVERLAP_BYTES
    for nbytes in sizes:
        try:
            with budget.reserve(nbytes, deadline_s):
                with lock:
                    held.value += nbytes
                    peak.value = max(peak.value, held.value)
                time.sleep(0.0005)  # hold briefly so reservations overlap
                with lock:
                    held.value -= nbytes
            outcomes.put(("ok", nbytes))
        except ContextMemoryUnavailable as err:
            outcomes.put(("unavailable", err.requested_bytes))


OVERLAP_BYTES = 20 * MiB


def _hold_until_killed(key, nbytes, ready):
    budget = SharedBudget(key)
    with budget.reserve(nbytes, 5.0):
        ready.set()
        time.sleep(60)  # killed long before this ends


def _hold_until_told(key, nbytes, ready, go):
    budget = SharedBudget(key)
    with budget.reserve(nbytes, 5.0):
        ready.set()
        go.wait(30)


def _reserve_and_report(key, nbytes, deadline_s, results):
    budget = SharedBudget(key)
    t0 = time.monotonic()
    try:
        with budget.reserve(nbytes, deadline_s):
            results.put(("ok", nbytes, time.monotonic() - t0))
    except ContextMemoryUnavailable as err:
        results.put(("unavailable", nbytes, err.waited_s))


def _small_stream(key, nbytes, stop, count):
    budget = SharedBudget(key)
    while not stop.is_set():
        try:
            with budget.reserve(nbytes, 10.0):
                time.sleep(0.001)
            with count.get_lock():
                count.value += 1
        except ContextMemoryUnavailable:
            pass


# -- tests ------------------------------------------------------------------------


def test_protocols():
    assert isinstance(UnboundedAdmission(), Admission)
    with UnboundedAdmission().reserve(10**15, 0.0):
        pass


def test_fast_path_and_snapshot(key):
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    with budget.reserve(30 * MiB, 1.0):
        snap = budget.snapshot()
        assert snap.used_bytes == 30 * MiB
        assert snap.holders == {os.getpid(): 30 * MiB}
        assert snap.capacity_bytes == 100 * MiB
    snap = budget.snapshot()
    assert snap.used_bytes == 0 and snap.holders == {}


def test_release_is_idempotent_and_zero_bytes_is_free(key):
    budget = SharedBudget(key, capacity_bytes=10)
    res = budget.reserve(10, 1.0)
    with res:
        res.release()
        assert budget.snapshot().used_bytes == 0
    assert budget.snapshot().used_bytes == 0
    with pytest.raises(EbbInternalError):
        with res:
            pass
    with budget.reserve(0, 0.0):
        assert budget.snapshot().used_bytes == 0


def test_capacity_unset_admits_everything_and_is_recorded(key):
    budget = SharedBudget(key)
    with budget.reserve(10**15, 0.0):
        snap = budget.snapshot()
        assert snap.capacity_bytes is None and snap.used_bytes == 10**15


def test_capacity_persists_for_a_second_handle(key):
    SharedBudget(key, capacity_bytes=123)
    assert SharedBudget(key).snapshot().capacity_bytes == 123


def test_released_on_exception(key):
    budget = SharedBudget(key, capacity_bytes=100)
    with pytest.raises(ValueError):
        with budget.reserve(60, 1.0):
            raise ValueError("call failed")
    assert budget.snapshot().used_bytes == 0


def test_deadline_raises_with_the_numbers(key):
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    with budget.reserve(70 * MiB, 1.0):
        t0 = time.monotonic()
        with pytest.raises(ContextMemoryUnavailable) as info:
            with budget.reserve(40 * MiB, 0.2):
                pass
        elapsed = time.monotonic() - t0
    err = info.value
    assert err.requested_bytes == 40 * MiB
    assert err.free_bytes == 30 * MiB
    assert 0.2 <= err.waited_s <= elapsed
    assert err.where == key
    assert budget.snapshot().waiters == 0


def test_larger_than_capacity_fails_at_once(key):
    budget = SharedBudget(key, capacity_bytes=100)
    t0 = time.monotonic()
    with pytest.raises(ContextMemoryUnavailable) as info:
        with budget.reserve(101, 5.0):
            pass
    assert time.monotonic() - t0 < 1.0
    assert info.value.requested_bytes == 101 and info.value.free_bytes == 100


def test_concurrency_never_exceeds_capacity(key):
    capacity = 100 * MiB
    SharedBudget(key, capacity_bytes=capacity)
    held, peak, lock = CTX.Value("q", 0, lock=False), CTX.Value("q", 0, lock=False), CTX.Lock()
    outcomes, start, together = CTX.Queue(), CTX.Event(), CTX.Barrier(4)
    sizes = [s * MiB for s in (10, 45, 30, 20, 60, 5, 35, 25) * 2]
    workers = [
        CTX.Process(target=_hammer, args=(key, sizes, 10.0, held, peak, lock, outcomes, start, together))
        for _ in range(4)
    ]
    for p in workers:
        p.start()
    start.set()
    results = [outcomes.get(timeout=30) for _ in range(len(sizes) * len(workers))]
    for p in workers:
        p.join(10)
        assert p.exitcode == 0
    assert peak.value <= capacity, f"{peak.value / MiB:.0f} MiB held at once, budget {capacity / MiB:.0f} MiB"
    # The workers really did hold at once: all four of the first reservations together
    # (a sleep inside the block alone did not guarantee it on a loaded 2-core CI machine).
    assert peak.value >= 4 * OVERLAP_BYTES
    assert all(kind == "ok" for kind, _ in results)
    assert SharedBudget(key).snapshot().used_bytes == 0


def test_killed_holder_is_reclaimed(key):
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_until_killed, args=(key, 80 * MiB, ready))
    holder.start()
    assert ready.wait(20)
    assert budget.snapshot().holders == {holder.pid: 80 * MiB}
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    # The waiter reclaims the dead holder's bytes on contention, well within its deadline.
    with budget.reserve(50 * MiB, 5.0):
        snap = budget.snapshot()
        assert snap.used_bytes == 50 * MiB and holder.pid not in snap.holders


def test_killed_holder_is_reclaimed_by_snapshot(key):
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_until_killed, args=(key, 80 * MiB, ready))
    holder.start()
    assert ready.wait(20)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    snap = budget.snapshot()
    assert snap.reclaimed_bytes == 80 * MiB and snap.used_bytes == 0


def test_killed_unreaped_holder_is_reclaimed(key):
    """A zombie (killed, not yet waited for) still answers kill(pid, 0); it holds nothing."""
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_until_killed, args=(key, 80 * MiB, ready))
    holder.start()
    assert ready.wait(20)
    os.kill(holder.pid, signal.SIGKILL)
    wait_for(lambda: budget.snapshot().used_bytes == 0, what="zombie's bytes reclaimed")
    holder.join(10)


def test_shrinking_capacity_under_reservations(key):
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    ready, go = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_until_told, args=(key, 80 * MiB, ready, go))
    holder.start()
    assert ready.wait(20)
    budget.set_capacity(50 * MiB)
    snap = budget.snapshot()
    assert snap.capacity_bytes == 50 * MiB and snap.used_bytes == 80 * MiB  # the holder keeps its bytes
    results = CTX.Queue()
    waiter = CTX.Process(target=_reserve_and_report, args=(key, 40 * MiB, 10.0, results))
    waiter.start()
    wait_for(lambda: budget.snapshot().waiters == 1, what="the new request to queue")
    assert budget.snapshot().waiting_pids == (waiter.pid,)  # who waits, not only how many
    assert results.empty()  # over the shrunk capacity: it waits
    go.set()
    kind, nbytes, _ = results.get(timeout=10)
    assert (kind, nbytes) == ("ok", 40 * MiB)
    for p in (holder, waiter):
        p.join(10)
        assert p.exitcode == 0
    assert budget.snapshot().used_bytes == 0


def test_shrinking_below_a_queued_request_fails_it_at_once(key):
    budget = SharedBudget(key, capacity_bytes=100 * MiB)
    with budget.reserve(80 * MiB, 1.0):
        results = CTX.Queue()
        waiter = CTX.Process(target=_reserve_and_report, args=(key, 60 * MiB, 20.0, results))
        waiter.start()
        wait_for(lambda: budget.snapshot().waiters == 1, what="the request to queue")
        budget.set_capacity(50 * MiB)
        kind, nbytes, waited_s = results.get(timeout=10)
    assert (kind, nbytes) == ("unavailable", 60 * MiB) and waited_s < 10
    waiter.join(10)


def test_large_request_is_not_starved(key):
    """Small requests that always fit beside each other keep the budget busy; a large
    one that needs all of it must still get in, well before its deadline."""
    capacity = 100 * MiB
    budget = SharedBudget(key, capacity_bytes=capacity)
    stop, count = CTX.Event(), CTX.Value("q", 0)
    streams = [CTX.Process(target=_small_stream, args=(key, 30 * MiB, stop, count)) for _ in range(3)]
    for p in streams:
        p.start()
    try:
        wait_for(lambda: count.value > 20, timeout_s=20, what="small requests to flow")
        t0 = time.monotonic()
        with budget.reserve(capacity, 10.0):
            waited = time.monotonic() - t0
            assert budget.snapshot().used_bytes == capacity
        before = count.value
        wait_for(lambda: count.value > before + 5, what="small requests to flow again")
    finally:
        stop.set()
        for p in streams:
            p.join(10)
    assert waited < 5.0


def test_threads_of_one_process_share_the_budget(key):
    import threading

    budget = SharedBudget(key, capacity_bytes=50)
    held, peak, lock = [0], [0], threading.Lock()

    def worker():
        for _ in range(200):
            with budget.reserve(20, 10.0):
                with lock:
                    held[0] += 20
                    peak[0] = max(peak[0], held[0])
                with lock:
                    held[0] -= 20

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] <= 50
    assert budget.snapshot().used_bytes == 0


def test_stale_file_is_refused(key):
    with open(budget_path(key), "wb") as f:
        f.write(b"x" * 100)
    from engine_runtime.memory.admission import SharedBudgetError

    with pytest.raises(SharedBudgetError, match="size 100 bytes"):
        SharedBudget(key)
