"""Where an arena's physical memory comes from: a ``PhysicalSource`` hands out
``PhysicalLease``s, created per call and released to the driver (``OwnedPhysical``)
or leased from the GPU's shared pool (``engine_runtime.memory.pool``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine_runtime import _cuda
from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.memory.modes import ContextMechanism


@dataclass
class PhysicalLease:
    """Physical memory backing one mapping: ``(handle, nbytes)`` pieces in address order."""

    pieces: list[tuple[Any, int]]
    nbytes: int
    release_fn: Any = None
    token: Any = field(default=None)

    def release(self) -> None:
        """Give the memory back; idempotent, and retryable: a release that raised is not done."""
        fn = self.release_fn
        if fn is not None:
            fn(self)
            self.release_fn = None


class PhysicalSource(Protocol):
    """Where an arena's physical memory comes from.

    A source whose ``keep_mapped`` attribute is true (the pool's client) also takes
    ``acquire(..., prefer=[chunk index by position])``, returns the chunk indices as the
    lease's ``token``, and offers ``add_retire_listener`` / ``remove_retire_listener``.
    A source that can grow (``grow_to_fit``: the pool's client) takes ``standing=True``
    for memory held for long.
    """

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
        # Released pieces leave the lease, so a retry after a failure releases only the rest.
        while lease.pieces:
            handle, _ = lease.pieces[0]
            _cuda.mem_release(handle)
            lease.pieces.pop(0)
