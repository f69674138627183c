"""Ebb's engine layer: engines whose execution-context memory lives only while a call runs.

Knows nothing of Ray: engines, memory modes, allocators, admission and pressure
probes work in any Python process.
"""

from engine_runtime.cuda_process import (
    DEFAULT_STACK_LIMIT_BYTES,
    get_cuda_stack_limit,
    measure_process_floor,
    process_floor_bytes,
    process_memory_breakdown,
    set_cuda_stack_limit,
)
from engine_runtime.engine import BaseEngine, Engine
from engine_runtime.errors import (
    BatchTooLargeError,
    ContextMemoryUnavailable,
    EbbError,
    EbbInternalError,
    EngineBrokenError,
    EngineClosedError,
    EngineLoadError,
    InputDtypeError,
    InputShapeError,
    InputValueError,
    InvalidInputError,
    MissingInputError,
    PlanIncompatibleError,
    StackLimitError,
    UnknownInputError,
    UnknownModelError,
    WeightsBudgetUnavailable,
    WeightsPageError,
)
from engine_runtime.group import EngineGroup, GroupConfigError
from engine_runtime.memory import (
    Admission,
    ContextBlock,
    ContextMechanism,
    MemoryMode,
    SharedBudget,
    UnboundedAdmission,
)
from engine_runtime.pressure import (
    GpuPressure,
    NvmlProbe,
    PressureProbe,
    ProbeUnavailable,
    StaticProbe,
    VirtualProbe,
)
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec
from engine_runtime.stats import EngineStats, StatsSnapshot
from engine_runtime.weights_tier import GroupBudget, ModelTierStatus, WeightsTier

__all__ = [
    "DEFAULT_STACK_LIMIT_BYTES",
    "Admission",
    "BaseEngine",
    "BatchTooLargeError",
    "ContextBlock",
    "ContextMechanism",
    "ContextMemoryUnavailable",
    "EbbError",
    "EbbInternalError",
    "Engine",
    "EngineBrokenError",
    "EngineClosedError",
    "EngineDescription",
    "EngineGroup",
    "EngineLoadError",
    "EngineStats",
    "GpuPressure",
    "GroupBudget",
    "GroupConfigError",
    "InputDtypeError",
    "InputShapeError",
    "InputValueError",
    "InvalidInputError",
    "MemoryMode",
    "MissingInputError",
    "ModelTierStatus",
    "NvmlProbe",
    "PlanIncompatibleError",
    "PressureProbe",
    "ProbeUnavailable",
    "ShapeProfile",
    "SharedBudget",
    "StackLimitError",
    "StaticProbe",
    "StatsSnapshot",
    "TensorSpec",
    "UnboundedAdmission",
    "UnknownInputError",
    "UnknownModelError",
    "VirtualProbe",
    "WeightsBudgetUnavailable",
    "WeightsPageError",
    "WeightsTier",
    "get_cuda_stack_limit",
    "measure_process_floor",
    "process_floor_bytes",
    "process_memory_breakdown",
    "set_cuda_stack_limit",
]
