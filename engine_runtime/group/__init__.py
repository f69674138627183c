"""Model groups: many engines in one process, weights tiered between the GPU and the host.

See ``engine_runtime.group.engine_group`` for the group and ``engine_runtime.weights_tier``
for the tiers; ``engine_runtime.cuda_process`` sets the per-process CUDA stack limit and
measures the process's floor.
"""

from engine_runtime.cuda_process import (
    DEFAULT_STACK_LIMIT_BYTES,
    get_cuda_stack_limit,
    measure_process_floor,
    process_floor_bytes,
    set_cuda_stack_limit,
)
from engine_runtime.errors import (
    UnknownModelError,
    WeightsBudgetUnavailable,
    WeightsPageError,
)
from engine_runtime.group.admission import GroupAdmission
from engine_runtime.group.engine_group import EngineGroup, GroupConfigError
from engine_runtime.weights_tier import GroupBudget, ModelTierStatus, WeightsTier

__all__ = [
    "DEFAULT_STACK_LIMIT_BYTES",
    "EngineGroup",
    "GroupAdmission",
    "GroupBudget",
    "GroupConfigError",
    "ModelTierStatus",
    "UnknownModelError",
    "WeightsBudgetUnavailable",
    "WeightsPageError",
    "WeightsTier",
    "get_cuda_stack_limit",
    "measure_process_floor",
    "process_floor_bytes",
    "set_cuda_stack_limit",
]
