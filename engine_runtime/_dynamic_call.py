"""One dynamic call's context memory: the admission, then the backend's allocation.

``BaseEngine.dynamic_context`` returns a ``DynamicCall``; both are released when the
``with`` block ends, whatever fails, and the engine's statistics count the wait, the
acquisition and the release.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from engine_runtime.errors import EbbInternalError
from engine_runtime.memory import ContextBlock
from engine_runtime.memory.admission import Admission
from engine_runtime.stats import EngineStats

#: An admission that took longer than this counts as a wait (the uncontended path
#: of a shared budget is a lock and a few words: microseconds).
ADMISSION_WAIT_S = 1e-3


class DynamicCall:
    """``BaseEngine.dynamic_context``: the admission entered, then the memory allocated;
    on exit the memory released, then the admission left, each whatever the other did.

    A class rather than a ``contextlib.contextmanager`` generator: it is entered on every
    dynamic call, and the generator's machinery cost microseconds of the per-call
    budget (``scripts/bench_pool.py --cpu-path``)."""

    __slots__ = ("_admission", "_stats", "_nbytes", "_deadline_s", "_allocate", "_admitted", "_block")

    def __init__(self, admission: Admission, stats: EngineStats, nbytes: int, deadline_s: float,
                 allocate: Callable[[int], ContextBlock]) -> None:
        self._admission, self._stats = admission, stats
        self._nbytes, self._deadline_s, self._allocate = nbytes, deadline_s, allocate
        self._admitted: contextlib.AbstractContextManager[None] | None = None
        self._block: ContextBlock | None = None

    def __enter__(self) -> ContextBlock:
        nbytes, stats = self._nbytes, self._stats
        t_admit = time.perf_counter()
        admitted = self._admission.reserve(nbytes, self._deadline_s)
        admitted.__enter__()
        try:
            t0 = time.perf_counter()
            if t0 - t_admit > ADMISSION_WAIT_S:
                stats.admission_waited()
            block = self._allocate(nbytes)
            stats.acquired(block.nbytes, time.perf_counter() - t0)
        except BaseException as err:
            admitted.__exit__(type(err), err, err.__traceback__)
            raise
        self._admitted, self._block = admitted, block
        return block

    def __exit__(self, *exc) -> bool | None:
        admitted, block = self._admitted, self._block
        self._admitted = self._block = None
        if admitted is None or block is None:
            raise EbbInternalError("dynamic_context exited without having been entered")
        try:
            try:
                block.release()
            finally:
                # Counted as given back even when the release raised: the arena has
                # dropped the mapping from its books (a failed unmap is retried there).
                self._stats.released(block.nbytes)
        except BaseException as err:
            admitted.__exit__(type(err), err, err.__traceback__)
            raise
        return admitted.__exit__(*exc)
