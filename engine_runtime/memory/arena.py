"""A context-memory arena with a stable virtual address (CUDA VMM).

The arena reserves a virtual range once. Physical memory is mapped into it for a
call and unmapped after, so the *address* never changes: TensorRT receives the same
pointer through ``set_device_memory`` every call, and a CUDA graph captured over the
range replays after its backing was released and mapped again (shown on an H200,
``shared/reference/gpu-measurements.md``). Where the physical memory comes from is a
``PhysicalSource``: created per call and released to the driver (``OwnedPhysical``),
or leased from the GPU's shared pool (``engine_runtime.memory.pool``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine_runtime import _cuda
from engine_runtime.errors import EbbInternalError
from engine_runtime.memory.allocators import ContextBlock
from engine_runtime.memory.modes import ContextMechanism
from engine_runtime.memory.physical import OwnedPhysical, PhysicalLease, PhysicalSource
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


@dataclass
class _Resident:
    """Pool chunks left mapped in one window after the call that leased them ended."""

    pieces: list[tuple[Any, int]]  # (handle, nbytes) by position
    tokens: list[int]  # the chunk index at each position

    @property
    def span(self) -> int:
        return sum(size for _, size in self.pieces)


class VmmArena:
    """One reserved virtual range per engine; physical memory mapped only while held.

    ``keep_mapped`` (pool sources only): after a call, give the lease back but leave its
    chunks mapped in their window. The next call asks the pool for the same chunks at the
    same positions and maps only those it did not get back: a replica called again
    before anyone else took its chunks maps nothing (the lease table alone, ~20 µs,
    instead of ~35 µs per chunk for cuMemMap and cuMemUnmap). This costs the card
    nothing, since a mapping of pool memory in a second process adds no physical memory,
    and it is safe, since a process only touches its window while it holds the lease:
    the lease, not the mapping, is what keeps two calls off one chunk. A chunk the pool
    retires is unmapped when the pool's watcher says so (or the memory would never
    return to the driver).
    """

    def __init__(self, device: int, reserve_bytes: int, source: PhysicalSource | None = None,
                 deadline_s: float = 5.0, keep_mapped: bool = True) -> None:
        self.device = device
        # A pool leases whole chunks and each is mapped whole, so windows and sizes are
        # counted in chunks when the source has them.
        self.granularity = max(_cuda.granularity(device), int(getattr(source, "chunk_bytes", 0) or 0))
        self.reserved_bytes = _cuda.round_up(max(int(reserve_bytes), 1), self.granularity)
        self.source: PhysicalSource = source or OwnedPhysical(device)
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._mapped: ContextBlock | None = None
        self._busy = False  # an allocate is between leasing and mapping
        # Mappings left in place between calls, by window offset; chunks the pool said
        # were retired while a call ran (unmapped when it ends).
        self._resident: dict[int, _Resident] = {}
        self._stale: set[int] = set()
        # Pieces (pool chunks, or whole allocations) mapped, and found still mapped from an
        # earlier call: how much keep_mapped saves on this card's traffic.
        self._pieces_mapped = 0
        self._pieces_reused = 0
        # (address, bytes) still mapped because their cuMemUnmap failed: retried before a
        # window over them is mapped again, so one failing call never wedges the next.
        self._unmap_pending: list[tuple[int, int]] = []
        # The source says whether it allows it (a pool client whose watcher reports retirements).
        self.keep_mapped = bool(keep_mapped) and bool(getattr(self.source, "keep_mapped", False))
        with _cuda.device(device):
            self.base = _cuda.address_reserve(self.reserved_bytes, self.granularity)
        if self.keep_mapped:
            self.source.add_retire_listener(self._on_retired)
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
                 source: PhysicalSource | None = None, deadline_s: float | None = None,
                 standing: bool = False) -> ContextBlock:
        """Map ``nbytes`` (rounded up to the granularity) of one physical allocation at
        ``base + offset`` for every offset.

        Several offsets map the *same* physical memory at several addresses: PyTorch's
        caching allocator keys blocks by address, so graphs captured for different
        batch sizes need disjoint address windows, yet only one runs at a time and they
        can share one physical backing. Each physical piece is mapped whole (CUDA
        refuses to map part of an allocation: CUDA_ERROR_NOT_SUPPORTED, seen on an
        H200), so a pooled lease of whole chunks may map a little more than asked.
        ``source`` overrides the arena's own for this mapping (graph capture maps memory
        of its own rather than draining the shared pool). ``deadline_s`` bounds the wait
        for physical memory (default the arena's). ``standing``: the mapping is held for
        long (static mode, graph capture), which a pool source grows for rather than
        wait for chunks that may never come back (``PoolPhysical.acquire``).
        """
        n = _cuda.round_up(max(int(nbytes), 1), self.granularity)
        src = source or self.source
        deadline = self.deadline_s if deadline_s is None else max(0.0, float(deadline_s))
        if self.keep_mapped and src is self.source and len(offsets) == 1 and not standing:
            return self._allocate_reusing(n, int(offsets[0]), deadline)
        with self._lock:
            if self._busy or self._in_call_locked():
                raise EbbInternalError("arena is already mapped; a second mapping would alias the first")
            self._busy = True
        try:
            with self._lock:
                # Windows mapped now must not overlap mappings left from earlier calls.
                self._drop_resident_locked()
            # Not under the lock: leasing may wait, and the pool's watcher takes the lock.
            lease = src.acquire(n, deadline, standing=True) if standing and hasattr(src, "grow_to_fit") \
                else src.acquire(n, deadline)
            with self._lock:
                span = sum(size for _, size in lease.pieces)
                done: list[int] = []
                try:
                    for off in offsets:
                        self._check_window(off, span)
                        self._retry_pending_locked(off, span)
                    with _cuda.device(self.device):
                        for off in offsets:
                            self._map_window(off, span, lease)
                            done.append(off)
                except BaseException:
                    try:
                        for off in done:
                            self._unmap_range_locked(self.base + off, span)
                    finally:
                        lease.release()
                    raise
                remaining = [self.base + off for off in offsets]
                block = ContextBlock(self.base + offsets[0], span,
                                     lambda b, lease=lease, left=remaining: self._unmap(b, lease, left))
                self._mapped = block
                return block
        finally:
            with self._lock:
                self._busy = False

    def _in_call_locked(self) -> bool:
        return self._mapped is not None and not self._mapped.released

    def _check_window(self, offset: int, span: int) -> None:
        if offset % self.granularity or offset < 0 or offset + span > self.reserved_bytes:
            raise EbbInternalError(
                f"arena window at +{offset / MiB:.0f} MiB of {span / MiB:.0f} MiB does not fit the "
                f"{self.reserved_bytes / MiB:.0f} MiB reserved (granularity {self.granularity})")

    def _allocate_reusing(self, n: int, offset: int, deadline_s: float) -> ContextBlock:
        """``allocate`` of one window from a pool, reusing what is still mapped there."""
        with self._lock:
            if self._busy or self._in_call_locked():
                raise EbbInternalError("arena is already mapped; a second mapping would alias the first")
            self._busy = True
            res = self._resident.get(offset)
            # The list itself: a resident's tokens are replaced, never changed in place.
            prefer = res.tokens if res is not None else ()
        lease: PhysicalLease | None = None
        try:
            # Leasing may wait for the admission deadline: not under the lock, which the
            # pool's watcher takes to unmap retired chunks.
            lease = self.source.acquire(n, deadline_s, prefer=prefer)
            span = sum(size for _, size in lease.pieces)
            self._check_window(offset, span)
            with self._lock:
                if self._unmap_pending:
                    self._retry_pending_locked(offset, span)
                # Windows never overlap when sized as the backends size them; should one
                # reach into another's, the other's leftover mapping goes first.
                if len(self._resident) > (offset in self._resident):
                    for off, res in list(self._resident.items()):
                        if off != offset and off < offset + span and offset < off + res.span:
                            del self._resident[off]
                            self._unmap_resident(off, res)
                self._remap_locked(offset, lease)
                block = ContextBlock(self.base + offset, span,
                                     lambda b, lease=lease, off=offset: self._give_back_mapped(b, lease, off))
                self._mapped = block
                self._busy = False
                return block
        except BaseException:
            try:
                if lease is not None:
                    lease.release()
            finally:
                with self._lock:
                    self._busy = False
            raise

    def _remap_locked(self, offset: int, lease: PhysicalLease) -> None:
        """Make window ``offset`` map exactly ``lease``'s pieces, touching only positions
        whose chunk changed. On failure the window is left unmapped."""
        addr = self.base + offset
        old = self._resident.pop(offset, None)
        tokens = [int(t) for t in lease.token]
        if old is not None and self._same_mapping(old, lease.pieces, tokens):
            # The common case with keep_mapped: this replica got back exactly what it has
            # mapped here, so there is nothing to map, unmap or give access to.
            self._pieces_reused += len(tokens)
            self._stale.clear()
            self._resident[offset] = old
            return
        sizes = [size for _, size in lease.pieces]
        starts = [0, *itertools.accumulate(sizes)][:-1]
        # Positions mapped now, with their (handle, size, start).
        mapped: dict[int, tuple[Any, int, int]] = {}
        if old is not None:
            old_sizes = [size for _, size in old.pieces]
            if any(a != b for a, b in zip(old_sizes, sizes)):
                self._unmap_resident(offset, old)  # other piece sizes: nothing lines up
                old = None
            else:
                old_starts = [0, *itertools.accumulate(old_sizes)][:-1]
                mapped = {k: (h, size, st) for k, ((h, size), st) in enumerate(zip(old.pieces, old_starts))}
        changed = False
        try:
            with _cuda.device(self.device):
                for k, (handle, size) in enumerate(lease.pieces):
                    cur = mapped.get(k)
                    if cur is not None and cur[0] is handle and old.tokens[k] == tokens[k] \
                            and tokens[k] not in self._stale:
                        self._pieces_reused += 1
                        continue
                    if cur is not None:
                        _cuda.mem_unmap(addr + cur[2], cur[1])
                        del mapped[k]
                    _cuda.mem_map(addr + starts[k], size, handle)
                    mapped[k] = (handle, size, starts[k])
                    self._pieces_mapped += 1
                    changed = True
                for k in [k for k in mapped if k >= len(sizes)]:  # the old lease was longer
                    _, size, start = mapped.pop(k)
                    _cuda.mem_unmap(addr + start, size)
                if changed:
                    # Access is set over the whole window at once, as in _map_window.
                    _cuda.set_access(self.device, addr, sum(sizes))
        except BaseException:
            with _cuda.device(self.device):
                for _, size, start in mapped.values():
                    _cuda.mem_unmap(addr + start, size)
            raise
        self._stale.clear()
        self._resident[offset] = _Resident(list(lease.pieces), tokens)

    def _same_mapping(self, old: _Resident, pieces: list[tuple[Any, int]], tokens: list[int]) -> bool:
        """Whether ``old`` maps exactly these pieces (the same handles, by identity, and
        sizes) of these chunks, none of which the pool retired meanwhile (``_stale``)."""
        if old.tokens != tokens or len(old.pieces) != len(pieces):
            return False
        for (handle, size), (old_handle, old_size) in zip(pieces, old.pieces):
            if handle is not old_handle or size != old_size:
                return False
        return not self._stale or self._stale.isdisjoint(tokens)

    def _give_back_mapped(self, block: ContextBlock, lease: PhysicalLease, offset: int) -> None:
        """End of a call: the lease goes back, the mapping stays (see the class docstring).

        Whatever fails here, the arena is free for the next call: a give-back that
        raised is retried by the block's next ``release``."""
        with self._lock:
            try:
                lease.release()
            finally:
                if self._mapped is block:
                    self._mapped = None
                if self._stale:
                    res = self._resident.get(offset)
                    stale, self._stale = self._stale, set()
                    if res is not None and not stale.isdisjoint(res.tokens):
                        # The pool retired one of these chunks while the call ran.
                        del self._resident[offset]
                        self._unmap_resident(offset, res)

    def _on_retired(self, indices: Sequence[int]) -> None:
        """The pool's watcher: chunks retired or recreated. Unmap them wherever left mapped."""
        told = set(indices)
        with self._lock:
            if self._busy or self._in_call_locked():
                # A call holds its chunks, which cannot retire under it: what was told is
                # about other chunks or earlier incarnations; settled when the call ends.
                self._stale |= told
            for off, res in list(self._resident.items()):
                if told.intersection(res.tokens) and not (self._in_call_locked()
                                                          and self._mapped.ptr == self.base + off):
                    del self._resident[off]
                    self._unmap_resident(off, res)

    def _unmap_resident(self, offset: int, res: _Resident) -> None:
        self._unmap_range_locked(self.base + offset, res.span)

    def _unmap_range_locked(self, addr: int, nbytes: int) -> None:
        """cuMemUnmap; on failure the range is remembered (retried before it is mapped
        again, and by ``close``) and the error raised."""
        try:
            with _cuda.device(self.device):
                _cuda.mem_unmap(addr, nbytes)
        except BaseException:
            self._unmap_pending.append((addr, nbytes))
            raise

    def _retry_pending_locked(self, offset: int, span: int) -> None:
        """Unmap what a failed release left mapped over window ``offset``; raises if it still fails."""
        lo, hi = self.base + offset, self.base + offset + span
        for addr, nbytes in [r for r in self._unmap_pending if r[0] < hi and lo < r[0] + r[1]]:
            with _cuda.device(self.device):
                _cuda.mem_unmap(addr, nbytes)
            self._unmap_pending.remove((addr, nbytes))
            logger.info("arena on cuda:%d: unmapped %.0f MiB at 0x%x left by a failed release",
                        self.device, nbytes / MiB, addr)

    @property
    def unmap_pending(self) -> int:
        """Ranges still mapped after a failing unmap (0 on a healthy arena)."""
        return len(self._unmap_pending)

    def _drop_resident_locked(self) -> None:
        # Each window is forgotten before its unmap: one that fails is pending, not resident.
        error: BaseException | None = None
        for off, res in list(self._resident.items()):
            del self._resident[off]
            try:
                self._unmap_resident(off, res)
            except Exception as err:  # noqa: BLE001 - the others are unmapped still; raised below
                error = error or err
        if error is not None:
            raise error

    def drop_resident(self) -> int:
        """Unmap every mapping left from earlier calls; returns how many windows."""
        with self._lock:
            count = len(self._resident)
            self._drop_resident_locked()
            return count

    @property
    def resident_windows(self) -> int:
        return len(self._resident)

    def mapping_counts(self) -> dict[str, int | bool]:
        """Pieces mapped and pieces found still mapped (``keep_mapped``), since the arena was made."""
        return {"keep_mapped": self.keep_mapped, "pieces_mapped": self._pieces_mapped,
                "pieces_reused": self._pieces_reused}

    def _map_window(self, offset: int, span: int, lease: PhysicalLease) -> None:
        addr = self.base + offset
        mapped = 0
        try:
            for handle, size in lease.pieces:
                _cuda.mem_map(addr + mapped, size, handle)
                mapped += size
                self._pieces_mapped += 1
            # One access call over the whole window: cheaper than one per piece.
            _cuda.set_access(self.device, addr, span)
        except BaseException:
            if mapped:
                _cuda.mem_unmap(addr, mapped)
            raise

    def _unmap(self, block: ContextBlock, lease: PhysicalLease, left: list[int]) -> None:
        """Release of a block mapped at every address in ``left``. The lease goes back and
        the arena is free for the next call even when an unmap fails (the range stays
        pending, retried before it is mapped again); the error is raised after."""
        with self._lock:
            error: BaseException | None = None
            try:
                while left:
                    addr = left.pop(0)
                    try:
                        self._unmap_range_locked(addr, block.nbytes)
                    except Exception as err:  # noqa: BLE001 - pending now; the lease still goes back
                        error = error or err
            finally:
                try:
                    lease.release()
                finally:
                    if self._mapped is block:
                        self._mapped = None
            if error is not None:
                raise error

    def close(self) -> None:
        """Unmap everything and free the address range; idempotent, and retryable after a
        failure (what was done stays done; the address range is freed only once nothing
        is mapped in it)."""
        errors: list[BaseException] = []
        block = self._mapped
        if block is not None and not block.released:
            try:
                block.release()
            except Exception as err:  # noqa: BLE001 - the rest is still torn down; raised below
                errors.append(err)
        if self.keep_mapped:
            self.source.remove_retire_listener(self._on_retired)
        with self._lock:
            try:
                self._drop_resident_locked()
            except Exception as err:  # noqa: BLE001 - raised below
                errors.append(err)
            for addr, nbytes in list(self._unmap_pending):
                try:
                    with _cuda.device(self.device):
                        _cuda.mem_unmap(addr, nbytes)
                    self._unmap_pending.remove((addr, nbytes))
                except Exception as err:  # noqa: BLE001 - raised below
                    errors.append(err)
            if self.base and not self._unmap_pending:
                with _cuda.device(self.device):
                    _cuda.address_free(self.base, self.reserved_bytes)
                self.base = 0
        if errors:
            raise errors[0]
