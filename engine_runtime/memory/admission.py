"""Admission control: a byte budget a dynamic call takes from before acquiring memory.

The engine layer depends only on the ``Admission`` protocol. ``UnboundedAdmission``
admits everything (a single process alone on its device). ``SharedBudget``
(:mod:`engine_runtime.memory.budget`) is one GPU's budget shared by every process on
the node; the per-GPU context pool's lease is an admission of its own
(:mod:`engine_runtime.memory.pool`), so an engine on the pool is given an unbounded one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

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
    "budget_path",
    "remove_unused_budgets",
]


@runtime_checkable
class Admission(Protocol):
    def reserve(self, nbytes: int, deadline_s: float) -> contextlib.AbstractContextManager[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block; raise
        ``ContextMemoryUnavailable`` if they cannot be had within ``deadline_s``."""
        ...


class UnboundedAdmission:
    """Admits every request at once; for engines with no shared budget."""

    @contextlib.contextmanager
    def reserve(self, nbytes: int, deadline_s: float) -> Iterator[None]:
        yield
