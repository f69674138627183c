"""One admission for every engine of a group: the group holds one call's context at a time.

A group replica is counted (by the memory-aware policy) as its resident weights plus
*one* call's context memory. ``GroupAdmission`` makes that true: a call takes its
context bytes from a local budget sized for the largest call of any engine of the
group, then from the replica's own admission (the GPU's shared budget, if any), so
the group's engines draw from one source and never hold one reservation each. A
call larger than the local budget is admitted when nothing else is in flight (the
budget follows the engines as they load, so this only happens on the first call
of a new, larger engine).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.memory.admission import Admission, UnboundedAdmission


class GroupAdmission:
    """``Admission``: a local byte budget of ``capacity_fn()`` bytes, then ``inner``."""

    def __init__(self, capacity_fn: Callable[[], int], inner: Admission | None = None, where: str = "group") -> None:
        self._capacity_fn = capacity_fn
        self.inner: Admission = inner or UnboundedAdmission()
        self.where = where
        self._cond = threading.Condition()
        self._used = 0
        self._in_flight = 0
        #: The most context bytes held at once by the group's calls (for tests and status).
        self.peak_used_bytes = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @contextlib.contextmanager
    def reserve(self, nbytes: int, deadline_s: float) -> Iterator[None]:
        nbytes = max(0, int(nbytes))
        t0 = time.monotonic()
        end = t0 + max(0.0, float(deadline_s))
        with self._cond:
            while not self._fits(nbytes):
                left = end - time.monotonic()
                if left <= 0:
                    raise ContextMemoryUnavailable(nbytes, max(0, self._capacity_fn() - self._used),
                                                   time.monotonic() - t0, self.where)
                self._cond.wait(left)
            self._used += nbytes
            self._in_flight += 1
            self.peak_used_bytes = max(self.peak_used_bytes, self._used)
        try:
            with self.inner.reserve(nbytes, max(0.0, end - time.monotonic())):
                yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._in_flight -= 1
                self._cond.notify_all()

    def _fits(self, nbytes: int) -> bool:
        return self._in_flight == 0 or self._used + nbytes <= self._capacity_fn()
