"""Context memory: when it is held (``modes``), how it is obtained (``mechanism`` decides;
``allocators``, ``physical``, ``arena`` do it), who may take how much (``admission``,
``budget``), and the per-GPU pool that lends it across processes (``pool``, a
subpackage imported on its own). ``_shm`` is the shared-memory primitive under both
cross-process tables (the budget and the pool's lease table).

``deployments/`` and the backends use the names below; the modules behind them are
free to move.
"""

from engine_runtime.memory.admission import (
    Admission,
    BudgetSnapshot,
    SharedBudget,
    SharedBudgetError,
    UnboundedAdmission,
    budget_path,
    remove_unused_budgets,
)
from engine_runtime.memory.allocators import (
    ContextAllocator,
    ContextBlock,
    CudaMallocAllocator,
    HostAccountingAllocator,
)
from engine_runtime.memory.arena import VmmArena
from engine_runtime.memory.mechanism import POOL_IN_USE, BackendKind, ContextFacts, ContextPlan, plan_context
from engine_runtime.memory.modes import ContextMechanism, MemoryMode
from engine_runtime.memory.physical import OwnedPhysical, PhysicalLease, PhysicalSource

__all__ = [
    "POOL_IN_USE",
    "Admission",
    "BackendKind",
    "BudgetSnapshot",
    "ContextAllocator",
    "ContextBlock",
    "ContextFacts",
    "ContextMechanism",
    "ContextPlan",
    "CudaMallocAllocator",
    "HostAccountingAllocator",
    "MemoryMode",
    "OwnedPhysical",
    "PhysicalLease",
    "PhysicalSource",
    "SharedBudget",
    "SharedBudgetError",
    "UnboundedAdmission",
    "VmmArena",
    "budget_path",
    "plan_context",
    "remove_unused_budgets",
]
