"""A stand-in for the subset of ``engine_runtime._cuda`` the context pool and the arena use.

A memfd stands in for a chunk of device memory (it crosses processes over
``SCM_RIGHTS`` exactly as a VMM export does), and virtual-memory mappings are
bookkept and checked as the driver would check them. Imported by name (``import
cuda_fake``), as the unit tests import ``trt_fake``; ``scripts/bench_pool.py
--cpu-path`` runs the per-call pool path on it to time the host side of a call.
"""

from __future__ import annotations

import os
import sys

from engine_runtime.errors import EbbInternalError

#: The fake driver's VMM granularity, and the tests' chunk size.
CHUNK = 2 * 2**20


class _FakeHandle:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.released = False


class FakeCuda:
    """The subset of ``engine_runtime._cuda`` the pool uses, backed by memfd."""

    CudaError = EbbInternalError
    live: dict[int, _FakeHandle] = {}

    @staticmethod
    def granularity(index: int) -> int:
        return CHUNK

    @staticmethod
    def device_uuid(index: int) -> str:
        return "GPU-fake"

    @staticmethod
    def mem_get_info(index: int) -> tuple[int, int]:
        return 64 * CHUNK, 64 * CHUNK

    @staticmethod
    def device(index: int):
        import contextlib

        return contextlib.nullcontext()

    class _Runtime:
        @staticmethod
        def cudaSetDevice(index: int):
            return (0,)

        @staticmethod
        def cudaFree(ptr: int):
            return (0,)

    @classmethod
    def runtime(cls):
        return cls._Runtime

    @staticmethod
    def _check(call: str, err) -> None:
        return None

    @classmethod
    def _track(cls, fd: int) -> _FakeHandle:
        h = _FakeHandle(fd)
        cls.live[id(h)] = h
        return h

    @classmethod
    def mem_create(cls, index: int, nbytes: int, shareable: bool = False) -> _FakeHandle:
        fd = os.memfd_create("ebb-fake-chunk")
        os.ftruncate(fd, nbytes)
        return cls._track(fd)

    @classmethod
    def mem_release(cls, h: _FakeHandle) -> None:
        if h.released:
            raise EbbInternalError("handle released twice")
        h.released = True
        os.close(h.fd)
        cls.live.pop(id(h))

    @staticmethod
    def export_fd(h: _FakeHandle) -> int:
        return os.dup(h.fd)

    # Virtual memory, for VmmArena: mappings are bookkept and checked as the driver
    # would (no overlap, unmap only of whole mappings, nothing mapped when freed).
    mappings: dict[int, tuple[int, _FakeHandle]] = {}  # address -> (bytes, handle)
    calls: dict[str, int] = {}
    _next_va = 1 << 40

    @staticmethod
    def round_up(n: int, to: int) -> int:
        return (n + to - 1) // to * to

    @classmethod
    def _count(cls, name: str) -> None:
        cls.calls[name] = cls.calls.get(name, 0) + 1

    @classmethod
    def address_reserve(cls, nbytes: int, alignment: int) -> int:
        ptr = cls._next_va
        cls._next_va += cls.round_up(nbytes, alignment) + alignment
        return ptr

    @classmethod
    def address_free(cls, ptr: int, nbytes: int) -> None:
        inside = [a for a in cls.mappings if ptr <= a < ptr + nbytes]
        if inside:
            raise EbbInternalError(f"address range freed with {len(inside)} mapping(s) in it")

    @classmethod
    def mem_map(cls, ptr: int, nbytes: int, handle: _FakeHandle, offset: int = 0) -> None:
        cls._count("map")
        if handle.released:
            raise EbbInternalError("mapping a released handle")
        for a, (n, _) in cls.mappings.items():
            if a < ptr + nbytes and ptr < a + n:
                raise EbbInternalError(f"mapping at 0x{ptr:x} overlaps one at 0x{a:x}")
        cls.mappings[ptr] = (nbytes, handle)

    @classmethod
    def mem_unmap(cls, ptr: int, nbytes: int) -> None:
        cls._count("unmap")
        inside = sorted(a for a in cls.mappings if ptr <= a < ptr + nbytes)
        covered = sum(cls.mappings[a][0] for a in inside)
        if not inside or covered != nbytes or inside[0] != ptr:
            raise EbbInternalError(f"unmap of 0x{ptr:x}+{nbytes} does not cover whole mappings")
        for a in inside:
            del cls.mappings[a]

    @classmethod
    def set_access(cls, index: int, ptr: int, nbytes: int) -> None:
        cls._count("set_access")

    @classmethod
    def import_fd(cls, fd: int) -> _FakeHandle:
        return cls._track(os.dup(fd))


def fake_cuda(monkeypatch=None) -> None:
    import engine_runtime

    FakeCuda.live, FakeCuda.mappings, FakeCuda.calls = {}, {}, {}
    if monkeypatch is not None:
        monkeypatch.setattr(engine_runtime, "_cuda", FakeCuda, raising=False)
        monkeypatch.setitem(sys.modules, "engine_runtime._cuda", FakeCuda)
    else:
        engine_runtime._cuda = FakeCuda
        sys.modules["engine_runtime._cuda"] = FakeCuda
