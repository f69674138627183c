"""A replica start never fails for want of pool size on a card with room.

Reported on an H200 (issue 12): ``context_pool: {enabled: true, chunk_bytes: 64 MiB}``,
``mode: static``, ``lazy: false``, an empty card, three ResNet-50 replicas: the
deployment never started (``ContextMemoryUnavailable: ... requested 256.0 MiB, free
128.0 MiB`` from ``_enter_static`` at warm-up). A static replica grew the pool only
when the pool's *capacity* was below its lease, never when the chunks were there but
held for good by the replicas already static; and growth was an absolute resize from
a capacity read a moment earlier, so two replicas could shrink each other's growth.

Here the owner and the replicas' clients run for real over the shared-memory table,
with CUDA faked by memfd (``cuda_fake.FakeCuda``): 64 MiB chunks cost nothing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from cuda_fake import FakeCuda, fake_cuda
from test_lease_table import WAIT_S

from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.units import MiB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool needs Linux")

CHUNK = 64 * MiB  # the reported configuration; memfd chunks are sparse, so free here


@pytest.fixture
def empty_pool(tmp_path: Path, monkeypatch):
    """An owner as a replica starts it on an empty card: no chunks yet (initial_bytes 0)."""
    from engine_runtime.memory import arena
    from engine_runtime.memory.pool import ContextPool

    fake_cuda(monkeypatch)
    monkeypatch.setattr(arena, "_cuda", FakeCuda)
    sock = Path(f"/tmp/ebb-grow-{os.getpid()}-{time.monotonic_ns()}.sock")
    pool = ContextPool(0, "GPU-fake", CHUNK, 0, sock, table_path=tmp_path / "pool.table", max_chunks=64)
    thread = threading.Thread(target=pool.serve_forever, daemon=True)
    thread.start()
    yield pool
    pool.stop()
    thread.join(WAIT_S)
    pool.close()


def replica(pool, deadline_s: float = 1.0):
    """A replica's pool client (grows up to the whole table, as join_context_pool asks) and arena."""
    from engine_runtime.memory.arena import VmmArena
    from engine_runtime.memory.pool import PoolPhysical

    client = PoolPhysical(pool.socket_path, 0, retire_poll_s=0.01, grow_limit_chunks=sys.maxsize)
    return client, VmmArena(0, 4 * 4 * CHUNK, source=client, deadline_s=deadline_s)


def enter_static(arena):
    """What PyTorchEngine._acquire_static_impl does at warm-up: 256 MiB behind every bucket window."""
    return arena.allocate(4 * CHUNK, [0, 4 * CHUNK, 8 * CHUNK], standing=True)


def test_reproduces_the_reported_start_failure_without_the_standing_growth(empty_pool):
    """The reported path as it was (a static lease that waits like a call): the figures of the report."""
    a, arena_a = replica(empty_pool)
    b, arena_b = replica(empty_pool, deadline_s=0.002)
    try:
        held = enter_static(arena_a)
        a.resize(6)  # the coordinator's target: 2 chunks free
        with pytest.raises(ContextMemoryUnavailable, match=r"requested 256\.0 MiB, free 128\.0 MiB"):
            arena_b.allocate(4 * CHUNK, [0, 4 * CHUNK, 8 * CHUNK])
        held.release()
    finally:
        for arena, c in ((arena_a, a), (arena_b, b)):
            arena.close()
            c.close()


def test_static_replicas_starting_on_an_empty_card_all_get_their_context(empty_pool):
    clients, blocks = [], []
    try:
        a, arena_a = replica(empty_pool)
        clients.append((a, arena_a))
        blocks.append(enter_static(arena_a))
        # The coordinator sized the pool from reports that knew one more replica's
        # (small) context: 6 chunks, 2 free, 128 MiB.
        a.resize(6)
        assert a.snapshot().free_bytes == 128 * MiB
        for _ in range(2):
            c, arena_c = replica(empty_pool)
            clients.append((c, arena_c))
            # Before: "requested 256.0 MiB, free 128.0 MiB" (the chunks were held for good).
            blocks.append(enter_static(arena_c))
        snap = a.snapshot()
        assert snap.states["LEASED"] == 12 and snap.capacity >= 12
    finally:
        for b in blocks:
            b.release()
        for c, arena in clients:
            arena.close()
            c.close()


def test_two_replicas_growing_at_once_do_not_shrink_each_other(empty_pool):
    a, arena_a = replica(empty_pool)
    b, arena_b = replica(empty_pool)
    try:
        held = enter_static(arena_a)  # 4 chunks, held for good
        # b's lease of 6 (more than the 4 there are) grows the pool *for it*: an absolute
        # resize to 6 would leave it 2 free chunks and a wait that cannot end.
        lease = b.acquire(6 * CHUNK, deadline_s=1.0)
        assert len(lease.pieces) == 6 and a.snapshot().capacity == 10
        b.grow_to_fit(1)  # a stale or smaller request never shrinks
        assert a.snapshot().capacity == 11
        lease.release()
        assert b.grow_to_fit(6)["capacity"] == 11  # enough free already: nothing changes
        held.release()
    finally:
        for arena, c in ((arena_a, a), (arena_b, b)):
            arena.close()
            c.close()


def test_a_standing_lease_grows_again_after_a_shrink_took_its_growth(empty_pool, monkeypatch):
    from engine_runtime.memory.pool import PoolPhysical

    a, arena_a = replica(empty_pool)
    try:
        held = enter_static(arena_a)
        real = PoolPhysical.grow_to_fit
        shrunk = []

        def grow_then_shrink(self, nchunks):
            out = real(self, nchunks)
            if not shrunk:  # the coordinator's stale target lands between growth and lease
                shrunk.append(self.resize(4))
            return out

        monkeypatch.setattr(PoolPhysical, "grow_to_fit", grow_then_shrink)
        b, arena_b = replica(empty_pool)
        try:
            block = enter_static(arena_b)
            assert shrunk and block.nbytes == 4 * CHUNK
            block.release()
        finally:
            arena_b.close()
            b.close()
        held.release()
    finally:
        arena_a.close()
        a.close()


def test_a_static_start_still_fails_when_the_card_has_no_room_and_says_so(empty_pool, monkeypatch):
    a, arena_a = replica(empty_pool, deadline_s=0.2)
    try:
        held = enter_static(arena_a)

        class Oom(FakeCuda.CudaError):
            oom = True

        def no_room(index, nbytes, shareable=False):
            raise Oom("cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY")

        monkeypatch.setattr(FakeCuda, "mem_create", staticmethod(no_room))
        b, arena_b = replica(empty_pool, deadline_s=0.2)
        try:
            t0 = time.monotonic()
            with pytest.raises(ContextMemoryUnavailable) as err:
                enter_static(arena_b)
            # It waited its deadline (chunks might have come back), then said what it asked for.
            assert time.monotonic() - t0 >= 0.2 and err.value.requested_bytes == 4 * CHUNK
            assert err.value.waited_s >= 0.2
        finally:
            arena_b.close()
            b.close()
        held.release()
    finally:
        arena_a.close()
        a.close()


def test_the_pytorch_backend_holds_static_memory_as_a_standing_lease():
    from types import SimpleNamespace

    from engine_runtime.backends.pytorch import PyTorchEngine

    calls = []
    engine = SimpleNamespace(
        _buckets={1: SimpleNamespace(context_bytes=CHUNK, offset=0), 2: SimpleNamespace(context_bytes=2 * CHUNK,
                                                                                      offset=4 * CHUNK)},
        _arena=SimpleNamespace(allocate=lambda nbytes, offsets, **kw: calls.append((nbytes, offsets, kw))))
    PyTorchEngine._acquire_static_impl(engine)
    assert calls == [(2 * CHUNK, [0, 4 * CHUNK], {"standing": True})]


def test_a_lease_that_cannot_grow_the_pool_for_want_of_an_owner_is_a_503(empty_pool):
    a, arena_a = replica(empty_pool, deadline_s=0.2)
    try:
        empty_pool.stop()  # the owner goes; the table stays
        a._sock.close()  # its socket with it, as when the owner's process dies
        with pytest.raises(ContextMemoryUnavailable):  # before: PoolUnavailableError, an HTTP 500
            a.acquire(2 * CHUNK, deadline_s=0.2)
    finally:
        arena_a.close()
        a.close()


def test_chunks_the_gone_owner_can_no_longer_send_are_a_503(empty_pool):
    a, arena_a = replica(empty_pool, deadline_s=0.2)
    try:
        a.grow_to_fit(2)  # created by the owner, not yet imported here
        a._sock.close()  # the owner's socket gone, as when its process dies
        with pytest.raises(ContextMemoryUnavailable, match="unreachable"):  # before: PoolUnavailableError
            a.acquire(2 * CHUNK, deadline_s=0.2)
        assert a.snapshot().holders == {}  # the lease went back
    finally:
        arena_a.close()
        a.close()
