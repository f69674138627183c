"""The context pool's lease table, exercised by real processes on shared memory.

No GPU and no Ray: the table is plain shared memory and a file lock, so every
property the pool relies on (one holder per chunk, deadlines, fairness, dead holders,
shrinking under leases) is tested here with processes that really race, die and wait.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import pytest

from cuda_fake import CHUNK, FakeCuda, fake_cuda
from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError
from engine_runtime.memory.pool._lease_table import ChunkState, LeaseTable, process_alive, process_start

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the lease table needs Linux")

# Spawned children start from a fresh interpreter, as replica processes do.
SPAWN = mp.get_context("spawn")
WAIT_S = 30.0  # upper bound for any handshake with a child; the tests never sleep to pass


@pytest.fixture
def table(tmp_path: Path):
    shm = Path("/dev/shm")
    directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    path = directory / f"ebb-test-{os.getpid()}-{time.monotonic_ns()}.table"
    t = LeaseTable.create(path, max_chunks=64, chunk_bytes=CHUNK, label="test-gpu")
    grow(t, 16)
    yield t
    t.close()
    path.unlink(missing_ok=True)


def grow(t: LeaseTable, n: int) -> None:
    """What the owner does: resize, 'create' the memory (none on a CPU), commit."""
    plan = t.resize(n)
    assert t.commit_created(plan.to_create) == []


def wait_for(condition, timeout_s: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s} s")
        time.sleep(0.005)


# --- workers (module level so spawned children can import them) --------------------


def _hammer(path: str, worker: int, owners, violations, leases, start, iterations: int, max_chunks: int,
            prefer_last: bool = False) -> None:
    """Lease, claim every chunk in a shared array, check nobody else claims them, give back.
    ``prefer_last``: ask for the chunks of the last lease again, as an arena that keeps
    its chunks mapped does (the lease table's word-by-word fast path)."""
    import random

    t = LeaseTable.open(path)
    rng = random.Random(worker)
    done = 0
    last: list[int] = []
    start.wait()  # all workers race from the same moment, however slow their start-up was
    for _ in range(iterations):
        indices = t.lease(rng.randint(1, max_chunks), deadline_s=10.0, prefer=last if prefer_last else ())
        last = indices
        for i in indices:
            if owners[i] != 0:
                violations.value += 1
            owners[i] = worker
        # Hold a moment so an overlapping holder would have time to show up.
        for _ in range(rng.randint(0, 200)):
            pass
        for i in indices:
            if owners[i] != worker:
                violations.value += 1
            owners[i] = 0
        t.give_back(indices)
        done += 1
    with leases.get_lock():
        leases.value += done
    t.close()


def _hold(path: str, nchunks: int, out, release, prefer: tuple[int, ...] = ()) -> None:
    """Lease ``nchunks`` (``prefer``: these ones), report them, hold until ``release`` is set (or until killed)."""
    t = LeaseTable.open(path)
    indices = t.lease(nchunks, deadline_s=10.0, prefer=prefer)
    out.put((os.getpid(), indices))
    release.wait(WAIT_S * 4)
    t.give_back(indices)
    out.put("given back")
    t.close()


def _wait_forever(path: str, nchunks: int, out) -> None:
    """Queue for more than is free and report being queued; killed while waiting."""
    t = LeaseTable.open(path)
    out.put(os.getpid())
    t.lease(nchunks, deadline_s=WAIT_S * 4)


def _churn(path: str, nchunks: int, started, stop) -> None:
    """Small leases back to back: the traffic that would starve a large request."""
    t = LeaseTable.open(path)
    first = True
    while not stop.is_set():
        indices = t.lease(nchunks, deadline_s=10.0)
        if first:
            started.set()
            first = False
        time.sleep(0.002)
        t.give_back(indices)
    t.close()


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefer_last", [False, True], ids=["lowest-free", "prefer-last-lease"])
def test_concurrent_leases_never_share_a_chunk(table: LeaseTable, prefer_last: bool) -> None:
    owners = SPAWN.Array("i", table.max_chunks, lock=False)
    violations = SPAWN.Value("i", 0, lock=True)
    leases = SPAWN.Value("i", 0, lock=True)
    start = SPAWN.Barrier(4)
    procs = [SPAWN.Process(target=_hammer, args=(str(table.path), w + 1, owners, violations, leases, start, 500, 6,
                                                 prefer_last))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT_S)
        assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"
    snap = table.snapshot()
    assert violations.value == 0, f"{violations.value} chunk(s) held by two processes at once"
    assert leases.value == 4 * 500
    assert snap.states["FREE"] == 16 and snap.holders == {} and snap.waiting == 0
    assert snap.leases_total == leases.value


def test_deadline_raises_the_distinct_error_with_numbers(table: LeaseTable) -> None:
    held = table.lease(15, deadline_s=0)
    try:
        start = time.monotonic()
        with pytest.raises(ContextMemoryUnavailable) as err:
            table.lease(2, deadline_s=0.2)
        waited = time.monotonic() - start
        e = err.value
        assert e.requested_bytes == 2 * CHUNK
        assert e.free_bytes == 1 * CHUNK
        assert 0.2 <= e.waited_s <= waited
        assert e.where == "test-gpu"
        assert "requested 4.0 MiB, free 2.0 MiB" in str(e)

        # No deadline: refused at once, with nothing waited.
        with pytest.raises(ContextMemoryUnavailable) as err:
            table.lease(2, deadline_s=0)
        assert err.value.waited_s == 0.0
        # Larger than the pool: refused at once whatever the deadline.
        start = time.monotonic()
        with pytest.raises(ContextMemoryUnavailable) as err:
            table.lease(17, deadline_s=30)
        assert time.monotonic() - start < 1.0
        assert err.value.requested_bytes == 17 * CHUNK
    finally:
        table.give_back(held)
    snap = table.snapshot()
    assert snap.timeouts_total == 2 and snap.waiting == 0


def test_a_large_request_is_not_starved_by_small_ones(table: LeaseTable) -> None:
    grow(table, 8)  # shrink to 8: 4 churners x 2 chunks could keep it busy forever
    table.collect_retired()
    stop = SPAWN.Event()
    started = [SPAWN.Event() for _ in range(4)]
    procs = [SPAWN.Process(target=_churn, args=(str(table.path), 2, s, stop)) for s in started]
    for p in procs:
        p.start()
    try:
        for s in started:
            assert s.wait(WAIT_S), "a churning worker never got its first lease"
        start = time.monotonic()
        big = table.lease(8, deadline_s=10.0)
        waited = time.monotonic() - start
        table.give_back(big)
    finally:
        stop.set()
        for p in procs:
            p.join(WAIT_S)
    assert all(p.exitcode == 0 for p in procs)
    # Each churner holds for ~2 ms; once the big request is queued nobody overtakes it,
    # so it waits for the current holders only.
    assert waited < 2.0, f"the 8-chunk lease waited {waited:.2f} s behind 2-chunk leases"


@pytest.mark.parametrize("prefer", [(), (9, 3, 12, 4, 7)], ids=["lowest-free", "preferred"])
def test_a_killed_holder_s_chunks_are_reclaimed(table: LeaseTable, prefer: tuple[int, ...]) -> None:
    out, release = SPAWN.Queue(), SPAWN.Event()
    p = SPAWN.Process(target=_hold, args=(str(table.path), 5, out, release, prefer))
    p.start()
    pid, indices = out.get(timeout=WAIT_S)
    assert indices == (list(prefer) or [0, 1, 2, 3, 4])
    assert table.held_by(pid) == sorted(indices)
    assert table.reclaim_dead() == []  # alive: nothing to take
    os.kill(pid, signal.SIGKILL)
    # Not reaped yet: a zombie counts as dead (its CUDA context is gone).
    wait_for(lambda: not process_alive(pid, process_start(pid) or 1), what="the killed holder to exit")
    assert sorted(table.reclaim_dead()) == sorted(indices)
    p.join(WAIT_S)
    snap = table.snapshot()
    assert snap.states["FREE"] == 16 and snap.holders == {} and snap.reclaimed_total == 5


def test_a_waiter_gets_a_dead_holder_s_chunks_without_help(table: LeaseTable) -> None:
    out, release = SPAWN.Queue(), SPAWN.Event()
    p = SPAWN.Process(target=_hold, args=(str(table.path), 10, out, release))
    p.start()
    pid, _ = out.get(timeout=WAIT_S)
    os.kill(pid, signal.SIGKILL)
    p.join(WAIT_S)
    # Nobody calls reclaim_dead: the waiter looks for dead holders while it waits.
    got = table.lease(16, deadline_s=5.0)
    assert len(got) == 16
    table.give_back(got)


def test_a_dead_waiter_does_not_block_the_line(table: LeaseTable) -> None:
    held = table.lease(10, deadline_s=0)
    out = SPAWN.Queue()
    p = SPAWN.Process(target=_wait_forever, args=(str(table.path), 12, out))
    p.start()
    pid = out.get(timeout=WAIT_S)
    wait_for(lambda: table.snapshot().waiting == 1, what="the child to queue")
    os.kill(pid, signal.SIGKILL)
    p.join(WAIT_S)
    table.give_back(held)
    # The dead waiter's ticket is ahead of ours; it is dropped within one reclaim period.
    got = table.lease(16, deadline_s=5.0)
    table.give_back(got)
    assert table.snapshot().waiting == 0


def test_shrinking_under_leases_keeps_held_chunks_until_given_back(table: LeaseTable) -> None:
    out, release = SPAWN.Queue(), SPAWN.Event()
    p = SPAWN.Process(target=_hold, args=(str(table.path), 3, out, release))
    p.start()
    pid, held = out.get(timeout=WAIT_S)
    gen0 = table.generation

    plan = table.resize(2)
    assert plan.capacity == 2
    assert len(plan.retired) == 13 and len(plan.draining) == 1 and plan.draining[0] in held
    assert table.generation > gen0  # clients learn that chunks retired
    snap = table.snapshot()
    assert snap.states == {**snap.states, "LEASED": 2, "DRAINING": 1, "RETIRED": 13, "FREE": 0}
    assert table.held_by(pid) == held  # the holder keeps all three
    assert sorted(table.collect_retired()) == sorted(plan.retired)
    with pytest.raises(ContextMemoryUnavailable):
        table.lease(1, deadline_s=0.05)  # nothing free until the holder gives back

    release.set()
    assert out.get(timeout=WAIT_S) == "given back"
    p.join(WAIT_S)
    snap = table.snapshot()
    assert snap.states["FREE"] == 2 and snap.states["RETIRED"] == 1
    assert table.chunk_state(plan.draining[0]) is ChunkState.RETIRED
    assert table.collect_retired() == plan.draining
    two = table.lease(2, deadline_s=0)
    with pytest.raises(ContextMemoryUnavailable):
        table.lease(3, deadline_s=5.0)  # over capacity: refused at once
    table.give_back(two)

    # Growing again: empty slots are created anew, with a new per-slot generation.
    before = {i: table.chunk_generation(i) for i in range(table.max_chunks)}
    plan = table.resize(6)
    assert len(plan.to_create) == 4 and plan.revived == []
    assert table.commit_created(plan.to_create) == []
    assert all(table.chunk_generation(i) == before[i] + 1 for i in plan.to_create)
    assert table.snapshot().states["FREE"] == 6


def test_resize_revives_draining_and_retired_before_creating(table: LeaseTable) -> None:
    held = table.lease(4, deadline_s=0)  # chunks 0..3
    plan = table.resize(1)
    assert sorted(plan.retired) == list(range(4, 16))  # every free chunk retires first
    assert plan.draining == [3, 2, 1]  # then held ones drain, highest first
    plan = table.resize(10)
    assert plan.revived == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # draining ones back first, no new memory
    assert plan.to_create == []
    snap = table.snapshot()
    assert (snap.states["LEASED"], snap.states["FREE"], snap.states["RETIRED"]) == (4, 6, 6)

    # A shrink that cancels chunks still being created: the owner must release their memory.
    plan = table.resize(20)
    assert plan.revived == list(range(10, 16)) and plan.to_create == [16, 17, 18, 19]
    cancel = table.resize(6)
    assert sorted(cancel.retired) == list(range(4, 16)) + [18, 19]
    assert table.commit_created(plan.to_create) == [18, 19]
    assert table.snapshot().states["FREE"] == 2
    table.give_back(held)
    # More than there are slots: the capacity is what can exist.
    assert table.resize(1000).capacity == table.max_chunks


@pytest.mark.parametrize("sizes", [(3, 2), (18, 17)], ids=["word-by-word", "vectorised"])
def test_give_back_refuses_what_is_not_one_whole_lease_of_its_own(table: LeaseTable, sizes) -> None:
    grow(table, 40)
    a = table.lease(sizes[0], deadline_s=0)
    b = table.lease(sizes[1], deadline_s=0)
    before = table.snapshot()
    for bad in (a[:2], a[:-1], a + b, [a[0], *a[:-1]], [a[0], a[0], a[1]], [99], [-1], [*a[:-1], 99]):
        with pytest.raises(EbbInternalError):
            table.give_back(bad)
        assert table.snapshot() == before  # refused: nothing changed
    table.give_back(a)
    with pytest.raises(EbbInternalError):
        table.give_back(a)  # twice: the chunks may be someone else's by now
    table.give_back(b)
    assert table.snapshot().states["FREE"] == 40


@pytest.mark.parametrize("nchunks", [2, 18], ids=["word-by-word", "vectorised"])
def test_a_lease_given_back_while_draining_retires(table: LeaseTable, nchunks: int) -> None:
    grow(table, 40)
    held = table.lease(nchunks, deadline_s=0, prefer=list(range(nchunks)))
    plan = table.resize(1)  # every free chunk retires, then all but one held chunk drains
    assert sorted(plan.draining) == list(range(1, nchunks))
    gen = table.generation
    table.give_back(held)
    snap = table.snapshot()
    assert (snap.states["FREE"], snap.states["RETIRED"], snap.holders) == (1, 40 - 1, {})
    assert table.generation == gen + 1  # clients learn that more chunks retired
    assert table.lease(1, deadline_s=0, prefer=[nchunks - 1]) == [0]  # a retired chunk is never lent


def test_preferred_free_chunks_are_not_taken_past_a_waiter(table: LeaseTable) -> None:
    mine = table.lease(1, deadline_s=0)  # chunk 0: what this replica keeps mapped
    table.give_back(mine)
    others = table.lease(15, deadline_s=0, prefer=list(range(1, 16)))  # every other chunk held
    out, release = SPAWN.Queue(), SPAWN.Event()
    waiter = SPAWN.Process(target=_hold, args=(str(table.path), 2, out, release))
    waiter.start()
    try:
        wait_for(lambda: table.snapshot().waiting == 1, what="the 2-chunk request to queue")
        with pytest.raises(ContextMemoryUnavailable):
            table.lease(1, deadline_s=0, prefer=mine)  # free and preferred, but someone waits first
        assert table.chunk_state(mine[0]) is ChunkState.FREE
        table.give_back(others)
        _, got = out.get(timeout=WAIT_S)
        assert got == [0, 1]  # the waiter was served first, with the chunk this replica wanted
    finally:
        release.set()
        waiter.join(WAIT_S)
    assert table.lease(1, deadline_s=0, prefer=mine) == mine


def test_a_forked_child_excludes_its_parent(table: LeaseTable) -> None:
    # The child inherits the parent's open file (and so its flock) unless it reopens.
    held = table.lease(16, deadline_s=0)
    ctx = mp.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        try:
            table.lease(1, deadline_s=0.2)
            out.put("leased")
        except ContextMemoryUnavailable:
            out.put("refused")

    p = ctx.Process(target=child)
    p.start()
    assert out.get(timeout=WAIT_S) == "refused"
    p.join(WAIT_S)
    table.give_back(held)


def test_uncontended_lease_and_give_back_take_the_fast_path(table: LeaseTable) -> None:
    # The cost is a row of scripts/bench_pool.py's table (--quick: the lease table alone);
    # what a test can assert is that an uncontended lease never queues.
    before = table.snapshot()
    for nchunks in (1, 8):
        times = []
        for _ in range(2000):
            start = time.perf_counter()
            got = table.lease(nchunks, deadline_s=1.0)
            table.give_back(got)
            times.append(time.perf_counter() - start)
        median_us = statistics.median(times) * 1e6
        print(f"lease+give_back of {nchunks} chunk(s): median {median_us:.1f} µs, "
              f"p90 {sorted(times)[int(0.9 * len(times))] * 1e6:.1f} µs")
    after = table.snapshot()
    assert after.leases_total - before.leases_total == 4000
    assert (after.waits_total, after.timeouts_total) == (before.waits_total, before.timeouts_total)
    assert after.states["FREE"] == 16 and after.holders == {}


# --- the pool's owner and client over the table, with CUDA faked by memfd ---------------
# The protocol (descriptors over SCM_RIGHTS, growth learnt on lease, retired imports
# dropped, dead clients reclaimed) needs no GPU: a memfd stands in for a chunk of
# device memory, and it crosses processes exactly as a VMM export does.


@pytest.fixture
def owner(tmp_path: Path, monkeypatch):
    import threading

    from engine_runtime.memory.pool import ContextPool

    fake_cuda(monkeypatch)
    sock = Path(f"/tmp/ebb-test-{os.getpid()}-{time.monotonic_ns()}.sock")  # AF_UNIX paths are short
    pool = ContextPool(0, "GPU-fake", CHUNK, 8, sock, table_path=tmp_path / "pool.table", max_chunks=32)
    thread = threading.Thread(target=pool.serve_forever, daemon=True)
    thread.start()
    yield pool
    pool.stop()
    thread.join(WAIT_S)
    pool.close()


def _lease_in_child(socket_path: str, nbytes: int, out) -> None:
    from engine_runtime.memory.pool import PoolPhysical

    fake_cuda()
    client = PoolPhysical(socket_path, 0)
    lease = client.acquire(nbytes, deadline_s=5.0)
    out.put((os.getpid(), lease.token))
    time.sleep(WAIT_S * 4)  # killed here, holding the lease


def test_pool_client_imports_leases_and_gives_back(owner) -> None:
    from engine_runtime.memory.pool import PoolPhysical

    with PoolPhysical(owner.socket_path, 0) as client:
        assert client.imported_chunks == list(range(8))
        assert client.mechanism.value == "vmm-pool"
        lease = client.acquire(3 * CHUNK - 1, deadline_s=1.0)  # rounds up to whole chunks
        assert lease.nbytes == 3 * CHUNK and len(lease.pieces) == 3
        assert all(size == CHUNK for _, size in lease.pieces)
        assert client.snapshot().holders == {os.getpid(): 3}
        lease.release()
        lease.release()  # idempotent
        assert client.snapshot().states["FREE"] == 8
        with pytest.raises(ContextMemoryUnavailable) as err:
            client.acquire(9 * CHUNK, deadline_s=1.0)
        assert err.value.requested_bytes == 9 * CHUNK and "GPU-fake" in err.value.where


def test_pool_growth_is_learnt_on_lease_and_shrink_drops_imports(owner) -> None:
    from engine_runtime.memory.pool import PoolPhysical

    with PoolPhysical(owner.socket_path, 0, retire_poll_s=0.01) as client:
        held = client.acquire(2 * CHUNK, deadline_s=1.0)  # chunks 0 and 1
        result = client.resize(12)
        assert result["capacity"] == 12 and result["created"] == 4 and result["error"] == ""
        assert client.imported_chunks == list(range(8))  # nothing sent until needed
        big = client.acquire(10 * CHUNK, deadline_s=1.0)  # needs the 4 new ones: fetched now
        assert client.imported_chunks == list(range(12))
        big.release()

        result = client.resize(1)  # 10 free retire now; one of the two held drains
        assert result["capacity"] == 1 and result["retired"] == 10 and result["draining"] == 1
        wait_for(lambda: client.imported_chunks == [0, 1], what="the watcher to drop retired imports")
        held.release()  # the draining chunk retires now; the owner releases it
        wait_for(lambda: len(client.imported_chunks) == 1, what="the drained chunk's import to go")
        wait_for(lambda: len(owner._handles) == 1, what="the owner to release the drained chunk")

        # Growing back recreates slots; a stale import of an old incarnation is replaced.
        client.resize(4)
        lease = client.acquire(4 * CHUNK, deadline_s=1.0)
        assert client.imported_chunks == [0, 1, 2, 3]
        lease.release()
    # Owner: 4 chunks; the client released every import on close.
    assert len(FakeCuda.live) == 4


def test_pool_reclaims_a_dead_client_s_lease(owner) -> None:
    out = SPAWN.Queue()
    p = SPAWN.Process(target=_lease_in_child, args=(str(owner.socket_path), 5 * CHUNK, out))
    p.start()
    pid, token = out.get(timeout=WAIT_S)
    assert owner.table.held_by(pid) == token
    os.kill(pid, signal.SIGKILL)
    p.join(WAIT_S)
    # The owner notices the closed socket and its periodic check finds the dead holder.
    wait_for(lambda: owner.table.held_by(pid) == [], what="the owner to reclaim the dead client's chunks")
    assert owner.table.snapshot().states["FREE"] == 8


def test_pool_is_unavailable_without_cuda_and_says_why() -> None:
    from engine_runtime.memory.pool import pool_available

    support = pool_available(0)
    if support:
        pytest.skip("this host can pool (a GPU is visible)")
    assert not support and support.reason
