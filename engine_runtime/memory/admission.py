"""Admission control: a byte budget a dynamic call takes from before acquiring memory.

The engine layer depends only on the ``Admission`` protocol. ``UnboundedAdmission``
admits everything (a single process alone on its device). ``SharedBudget``
(:mod:`engine_runtime.memory.budget`) is one GPU's budget shared by every process on
the node; the per-GPU context pool's lease is an admission of its own
(:mod:`engine_runtime.memory.pool`), so an engine on the pool is given an unbounded one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.memory.budget import (
    BudgetSnapshot,
    SharedBudget,
    SharedBudgetError,
    budget_path,
    remove_unused_budgets,
)

__all__ = [
    "Admission",
    "BudgetSnapshot",
    "SharedBudget",
    "SharedBudgetError",
    "UnboundedAdmission",
    "admitted_transient",
    "budget_path",
    "remove_unused_budgets",
    "warmup_estimate_bytes",
]


@runtime_checkable
class Admission(Protocol):
    def reserve(self, nbytes: int, deadline_s: float) -> contextlib.AbstractContextManager[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block; raise
        ``ContextMemoryUnavailable`` if they cannot be had within ``deadline_s``."""
        ...


class UnboundedAdmission:
    """Admits every request at once; for engines with no shared budget (and on the
    GPU's pool, whose lease is the admission)."""

    #: Entered once per dynamic call: one stateless manager, not a generator per call.
    _ADMITTED = contextlib.nullcontext()

    def reserve(self, nbytes: int, deadline_s: float) -> contextlib.AbstractContextManager[None]:
        return self._ADMITTED


#: How often a starting engine looks at the card's free memory while it waits.
_FREE_POLL_S = 0.01


def warmup_estimate_bytes(prev_batch: int, prev_peak_bytes: int, batch: int, floor_bytes: int) -> int:
    """Bytes to admit before warming up ``batch`` from the last bucket's measured peak.

    Activations grow about linearly with the batch, so the previous bucket's peak scaled
    by the ratio is the estimate; ``floor_bytes`` covers the first bucket (nothing
    measured yet) and the libraries' workspaces, which do not scale.
    """
    if prev_batch <= 0 or prev_peak_bytes <= 0:
        return int(floor_bytes)
    return max(int(floor_bytes), -(-prev_peak_bytes * batch // prev_batch))


@contextlib.contextmanager
def admitted_transient(admission: Admission, nbytes: int, deadline_s: float, *,
                       free_bytes: Callable[[], int] | None = None, where: str = "") -> Iterator[None]:
    """Admit memory a *starting* engine takes outside its context arena (an eager warm-up
    in PyTorch's caching allocator, say) as a call's context is admitted.

    The bytes are held in ``admission`` (the GPU's shared budget) for the ``with`` block,
    so neighbours' calls count them; and where ``free_bytes`` (the card's free memory) is
    given, the block also waits, within the same deadline, until the card has them.
    Raises ``ContextMemoryUnavailable`` with the figures when the deadline passes first:
    the start then fails as a call would, with a 503-shaped error instead of an
    out-of-memory error part-way through the warm-up.
    """
    start = time.monotonic()
    with admission.reserve(nbytes, deadline_s):
        if free_bytes is not None:
            while True:
                free = int(free_bytes())
                if free >= nbytes:
                    break
                waited = time.monotonic() - start
                if waited >= deadline_s:
                    raise ContextMemoryUnavailable(nbytes, free, waited, where)
                time.sleep(min(_FREE_POLL_S, max(deadline_s - waited, 0.0)))
        yield
