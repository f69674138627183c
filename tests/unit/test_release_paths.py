"""Release paths under a failing CUDA call: a block is released only once its release
succeeded (and may be released again after a failure), and an arena whose unmap
failed is free for the next call; the range left mapped is retried, never mapped
over. CUDA is faked (``cuda_fake.FakeCuda``) with one call made to fail.
"""

from __future__ import annotations

import sys

import pytest
from cuda_fake import CHUNK, FakeCuda, fake_cuda
from test_lease_table import owner  # noqa: F401 - the memfd-backed owner fixture

from engine_runtime.errors import EbbInternalError
from engine_runtime.memory import ContextBlock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fake CUDA uses memfd")


class Boom(EbbInternalError):
    pass


@pytest.fixture
def fake(monkeypatch):
    from engine_runtime.memory import arena, physical

    fake_cuda(monkeypatch)
    monkeypatch.setattr(arena, "_cuda", FakeCuda)
    monkeypatch.setattr(physical, "_cuda", FakeCuda)
    return FakeCuda


def fail_next(monkeypatch, name: str, times: int = 1) -> list[int]:
    """Make ``FakeCuda.<name>`` raise the next ``times`` calls; returns a call counter."""
    real = getattr(FakeCuda, name)
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= times:
            raise Boom(f"{name} failed (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(FakeCuda, name, staticmethod(failing))
    return calls


def test_a_block_whose_release_failed_is_still_held_and_released_on_retry():
    attempts = []

    def release(block):
        attempts.append(block)
        if len(attempts) == 1:
            raise Boom("cudaFree failed")

    block = ContextBlock(0x1000, 10, release)
    with pytest.raises(Boom):
        block.release()
    assert not block.released
    block.release()
    assert block.released and len(attempts) == 2
    block.release()  # idempotent once done
    assert len(attempts) == 2


@pytest.mark.parametrize("offsets", [(0,), (0, 4 * CHUNK)])
def test_an_arena_whose_unmap_failed_serves_the_next_call(fake, monkeypatch, offsets):
    from engine_runtime.memory.arena import VmmArena

    arena = VmmArena(0, 8 * CHUNK)
    block = arena.allocate(2 * CHUNK, offsets)
    assert len(fake.live) == 1 and len(fake.mappings) == len(offsets)
    fail_next(monkeypatch, "mem_unmap")
    with pytest.raises(Boom):
        block.release()
    # The physical memory went back (the lease is not held) and the arena is not "mapped".
    assert len(fake.live) == 0 and arena.mapped_bytes == 0 and arena.unmap_pending == 1
    block.release()  # a retry finds nothing left to do
    assert block.released
    # The next call maps over the failed range only after unmapping it.
    with arena.allocate(2 * CHUNK, offsets):
        assert arena.unmap_pending == 0 and len(fake.mappings) == len(offsets)
    assert fake.mappings == {} and fake.live == {}
    arena.close()


def test_a_failing_release_of_physical_memory_is_retried_not_forgotten(fake, monkeypatch):
    from engine_runtime.memory.arena import VmmArena

    arena = VmmArena(0, 8 * CHUNK)
    block = arena.allocate(CHUNK)
    fail_next(monkeypatch, "mem_release")
    with pytest.raises(Boom):
        block.release()
    assert not block.released and len(fake.live) == 1 and arena.mapped_bytes == 0
    block.release()
    assert block.released and fake.live == {}
    with arena.allocate(CHUNK):
        pass
    arena.close()


def test_close_after_a_failing_unmap_can_be_retried_and_frees_the_range(fake, monkeypatch):
    from engine_runtime.memory.arena import VmmArena

    arena = VmmArena(0, 8 * CHUNK)
    arena.allocate(CHUNK)  # still mapped at close: close releases it
    freed = []
    monkeypatch.setattr(FakeCuda, "address_free", classmethod(lambda cls, p, n: freed.append(p)))
    fail_next(monkeypatch, "mem_unmap", times=2)  # the release's unmap, and close's own retry
    with pytest.raises(Boom):
        arena.close()
    assert freed == [] and arena.base  # not freed with a mapping inside
    arena.close()
    assert len(freed) == 1 and arena.base == 0 and fake.mappings == {} and fake.live == {}
    arena.close()  # idempotent
    assert len(freed) == 1


@pytest.fixture
def pooled_arena(owner, monkeypatch):  # noqa: F811
    from engine_runtime.memory import arena as arena_mod
    from engine_runtime.memory.arena import VmmArena
    from engine_runtime.memory.pool import PoolPhysical

    monkeypatch.setattr(arena_mod, "_cuda", FakeCuda)
    with PoolPhysical(owner.socket_path, 0, retire_poll_s=0.01) as client:
        arena = VmmArena(0, 8 * CHUNK, source=client, deadline_s=1.0, keep_mapped=True)
        yield arena, client
        arena.close()


def test_a_failing_give_back_of_a_kept_mapping_does_not_wedge_the_arena(pooled_arena, monkeypatch):
    arena, client = pooled_arena
    real = client._give_back
    calls = []

    def failing(lease):
        calls.append(lease)
        if len(calls) == 1:
            raise Boom("give back failed (injected)")
        real(lease)

    monkeypatch.setattr(client, "_give_back", failing)
    block = arena.allocate(2 * CHUNK)  # its lease gives back through the failing function
    with pytest.raises(Boom):
        block.release()
    assert arena.mapped_bytes == 0  # not "already mapped" for the next call
    block.release()  # the retry gives the lease back
    assert block.released and client.snapshot().holders == {}
    with arena.allocate(2 * CHUNK) as again:
        assert again.nbytes == 2 * CHUNK


def test_a_failing_unmap_of_a_retired_kept_mapping_is_retried_before_the_window_maps(pooled_arena, monkeypatch):
    arena, _ = pooled_arena
    with arena.allocate(2 * CHUNK):
        pass
    assert arena.resident_windows == 1
    fail_next(monkeypatch, "mem_unmap")
    with pytest.raises(Boom):
        arena.drop_resident()
    assert arena.resident_windows == 0 and arena.unmap_pending == 1
    with arena.allocate(2 * CHUNK):
        assert arena.unmap_pending == 0


def test_a_failing_release_at_the_end_of_a_call_does_not_leave_bytes_counted_as_held():
    import numpy as np

    from engine_runtime.memory import ContextBlock as Block
    from test_engine import PER_SAMPLE_BYTES, RecordingEngine

    def failing(block):
        raise Boom("cuMemUnmap failed (injected)")

    class FailingRelease(RecordingEngine):
        def _execute_impl(self, inputs, shapes, mode):
            with self.dynamic_context(self.context_bytes(shapes), lambda n: Block(0, n, failing)):
                return {"y": inputs["x"] * 2}

    engine = FailingRelease()
    with pytest.raises(Boom):
        engine.infer({"x": np.ones((2, 4), np.float32)})
    assert engine.stats().context_bytes_held == 0 and engine.stats().last_context_bytes == 2 * PER_SAMPLE_BYTES
    engine.close()
