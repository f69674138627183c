"""Allocators that back an engine's context memory with blocks released to the driver.

A ``ContextAllocator`` says *how* context memory is obtained and, crucially, that it
goes back to the GPU driver on release — not into PyTorch's caching allocator, where
neighbours on the card could not use it (the flaw of Torch-TensorRT's per-call
allocation).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, runtime_checkable

from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError
from engine_runtime.memory.modes import ContextMechanism
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


class ContextBlock:
    """Context memory held for a while. Release is idempotent; use as a context manager.

    The block counts as released only once its release function returned: one that
    raised (a failing CUDA call) leaves the block held, and ``release`` may be called
    again. Release functions are written to be retried (they do only what is left).
    """

    def __init__(self, ptr: int, nbytes: int, release_fn) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self._release_fn = release_fn
        self._lock = threading.Lock()
        self.released = False

    def release(self) -> None:
        # Held while the function runs: two threads releasing at once release once.
        with self._lock:
            if self.released:
                return
            self._release_fn(self)
            self.released = True

    def __enter__(self) -> ContextBlock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        # Never free here (an interpreter shutting down may have no CUDA left); only say so.
        if not getattr(self, "released", True):
            logger.warning("context block of %.1f MiB at 0x%x was never released", self.nbytes / MiB, self.ptr)


@runtime_checkable
class ContextAllocator(Protocol):
    """Obtains context memory and gives it back to where others can use it."""

    mechanism: ContextMechanism

    def allocate(self, nbytes: int) -> ContextBlock:
        """Return a block of at least ``nbytes``; raise ``ContextMemoryUnavailable`` if none."""
        ...

    def close(self) -> None:
        ...


class HostAccountingAllocator:
    """For hosts without a GPU: the block is a receipt, not memory.

    On a CPU, PyTorch's own allocator holds activations during a call and frees them
    after; what this allocator tracks is the *size* of that memory, so that budgets,
    accounting and the coordinator behave as they would on a card.
    """

    mechanism = ContextMechanism.HOST_ACCOUNTING

    def allocate(self, nbytes: int) -> ContextBlock:
        return ContextBlock(0, int(nbytes), lambda block: None)

    def close(self) -> None:
        return None


class CudaMallocAllocator:
    """``cudaMalloc`` per acquisition, ``cudaFree`` on release: memory goes back to the driver.

    The address changes from call to call, so it suits TensorRT's ``set_device_memory``
    but not a captured CUDA graph; :class:`engine_runtime.memory.arena.VmmArena` is for that.
    """

    mechanism = ContextMechanism.CUDA_MALLOC

    def __init__(self, device: int = 0) -> None:
        self.device = device

    def allocate(self, nbytes: int) -> ContextBlock:
        from engine_runtime import _cuda

        if nbytes <= 0:
            return ContextBlock(0, 0, lambda block: None)
        with _cuda.device(self.device):
            err, ptr = _cuda.runtime().cudaMalloc(nbytes)
        if int(err) != 0:
            free = _cuda.mem_get_info(self.device)[0]
            raise ContextMemoryUnavailable(nbytes, free, where=f"cuda:{self.device}")
        return ContextBlock(int(ptr), int(nbytes), self._free)

    def _free(self, block: ContextBlock) -> None:
        from engine_runtime import _cuda

        with _cuda.device(self.device):
            (err,) = _cuda.runtime().cudaFree(block.ptr)
        if int(err) != 0:
            raise EbbInternalError(f"cudaFree(0x{block.ptr:x}) failed: {err}")

    def close(self) -> None:
        return None
