"""A context-memory arena with a stable virtual address (CUDA VMM).

The arena reserves a virtual range once. Physical memory is mapped into it for a
call and unmapped after, so the *address* never changes: TensorRT receives the same
pointer through ``set_device_memory`` every call, and a CUDA graph captured over the
range replays after its backing was released and mapped again (shown on an H200,
``shared/reference/gpu-measurements.md``). Where the physical memory comes from is a
``PhysicalSource``: created per call and released to the driver (``OwnedPhysical``),
or leased from the GPU's shared pool (``engine_runtime.pool``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine_runtime import _cuda
from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError
from engine_runtime.memory import ContextBlock, ContextMechanism, MiB

logger = logging.getLogger(__name__)


@dataclass
class PhysicalLease:
    """Physical memory backing one mapping: ``(handle, nbytes)`` pieces in address order."""

    pieces: list[tuple[Any, int]]
    nbytes: int
    release_fn: Any = None
    token: Any = field(default=None)

    def release(self) -> None:
        if self.release_fn is not None:
            fn, self.release_fn = self.release_fn, None
            fn(self)


class PhysicalSource(Protocol):
    mechanism: ContextMechanism

    def acquire(self, nbytes: int, deadline_s: float) -> PhysicalLease:
        """Physical memory of ``nbytes`` (a multiple of the granularity) or ContextMemoryUnavailable."""
        ...


class OwnedPhysical:
    """Physical memory created for each acquisition and released to the driver after."""

    mechanism = ContextMechanism.VMM_ARENA

    def __init__(self, device: int) -> None:
        self.device = device

    def acquire(self, nbytes: int, deadline_s: float) -> PhysicalLease:
        # A failed cuMemCreate is retried until the deadline: memory freed by a
        # neighbour that has just finished its call is the common way out.
        start = time.monotonic()
        delay = 0.0005
        while True:
            try:
                handle = _cuda.mem_create(self.device, nbytes)
                return PhysicalLease([(handle, nbytes)], nbytes, self._release)
            except _cuda.CudaError as err:
                if not err.oom:
                    raise
                waited = time.monotonic() - start
                if waited >= deadline_s:
                    free = _cuda.mem_get_info(self.device)[0]
                    raise ContextMemoryUnavailable(nbytes, free, waited, f"cuda:{self.device}") from err
                time.sleep(min(delay, max(deadline_s - waited, 0)))
                delay = min(delay * 2, 0.02)

    @staticmethod
    def _release(lease: PhysicalLease) -> None:
        for handle, _ in lease.pieces:
            _cuda.mem_release(handle)


class VmmArena:
    """One reserved virtual range per engine; physical memory mapped only while held."""

    def __init__(self, device: int, reserve_bytes: int, source: PhysicalSource | None = None,
                 deadline_s: float = 5.0) -> None:
        self.device = device
        # A pool leases whole chunks and each is mapped whole, so windows and sizes are
        # counted in chunks when the source has them.
        self.granularity = max(_cuda.granularity(device), int(getattr(source, "chunk_bytes", 0) or 0))
        self.reserved_bytes = _cuda.round_up(max(int(reserve_bytes), 1), self.granularity)
        self.source: PhysicalSource = source or OwnedPhysical(device)
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._mapped: ContextBlock | None = None
        with _cuda.device(device):
            self.base = _cuda.address_reserve(self.reserved_bytes, self.granularity)
        logger.debug("arena reserved %.0f MiB of address space at 0x%x on cuda:%d",
                     self.reserved_bytes / MiB, self.base, device)

    @property
    def mechanism(self) -> ContextMechanism:
        return self.source.mechanism

    @property
    def mapped_bytes(self) -> int:
        block = self._mapped
        return 0 if block is None or block.released else block.nbytes

    def allocate(self, nbytes: int, offsets: Sequence[int] = (0,),
                 source: PhysicalSource | None = None) -> ContextBlock:
        """Map ``nbytes`` (rounded up to the granularity) of one physical allocation at
        ``base + offset`` for every offset.

        Several offsets map the *same* physical memory at several addresses: PyTorch's
        caching allocator keys blocks by address, so graphs captured for different
        batch sizes need disjoint address windows, yet only one runs at a time and they
        can share one physical backing. Each physical piece is mapped whole (CUDA
        refuses to map part of an allocation: CUDA_ERROR_NOT_SUPPORTED, seen on an
        H200), so a pooled lease of whole chunks may map a little more than asked.
        ``source`` overrides the arena's own for this mapping (graph capture maps memory
        of its own rather than draining the shared pool).
        """
        n = _cuda.round_up(max(int(nbytes), 1), self.granularity)
        with self._lock:
            if self._mapped is not None and not self._mapped.released:
                raise EbbInternalError("arena is already mapped; a second mapping would alias the first")
            lease = (source or self.source).acquire(n, self.deadline_s)
            span = sum(size for _, size in lease.pieces)
            done: list[int] = []
            try:
                for off in offsets:
                    if off % self.granularity or off < 0 or off + span > self.reserved_bytes:
                        raise EbbInternalError(
                            f"arena window at +{off / MiB:.0f} MiB of {span / MiB:.0f} MiB does not fit the "
                            f"{self.reserved_bytes / MiB:.0f} MiB reserved (granularity {self.granularity})")
                with _cuda.device(self.device):
                    for off in offsets:
                        self._map_window(off, span, lease)
                        done.append(off)
            except BaseException:
                with _cuda.device(self.device):
                    for off in done:
                        _cuda.mem_unmap(self.base + off, span)
                lease.release()
                raise
            block = ContextBlock(self.base + offsets[0], span,
                                 lambda b, lease=lease, offs=tuple(offsets): self._unmap(b, lease, offs))
            self._mapped = block
            return block

    def _map_window(self, offset: int, span: int, lease: PhysicalLease) -> None:
        addr = self.base + offset
        mapped = 0
        try:
            for handle, size in lease.pieces:
                _cuda.mem_map(addr + mapped, size, handle)
                mapped += size
            # One access call over the whole window: cheaper than one per piece.
            _cuda.set_access(self.device, addr, span)
        except BaseException:
            if mapped:
                _cuda.mem_unmap(addr, mapped)
            raise

    def _unmap(self, block: ContextBlock, lease: PhysicalLease, offsets: tuple[int, ...]) -> None:
        with _cuda.device(self.device):
            for off in offsets:
                _cuda.mem_unmap(self.base + off, block.nbytes)
        lease.release()
        with self._lock:
            if self._mapped is block:
                self._mapped = None

    def close(self) -> None:
        if self._mapped is not None and not self._mapped.released:
            self._mapped.release()
        if self.base:
            with _cuda.device(self.device):
                _cuda.address_free(self.base, self.reserved_bytes)
            self.base = 0
