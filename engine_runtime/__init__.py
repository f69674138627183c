"""Ebb's engine layer: engines whose execution-context memory lives only while a call runs.

Knows nothing of Ray: engines, memory modes, allocators, admission and pressure
probes work in any Python process.
"""

from engine_runtime.stats import EngineStats, StatsSnapshot
from engine_runtime.engine import BaseEngine, Engine
from engine_runtime.errors import (
    BatchTooLargeError,
    ContextMemoryUnavailable,
    EbbError,
    EbbInternalError,
    EngineClosedError,
    EngineLoadError,
    InputDtypeError,
    InputShapeError,
    InputValueError,
    InvalidInputError,
    MissingInputError,
    PlanIncompatibleError,
    UnknownInputError,
)
from engine_runtime.memory import Admission, ContextBlock, ContextMechanism, MemoryMode, SharedBudget, UnboundedAdmission
from engine_runtime.pressure import GpuPressure, NvmlProbe, PressureProbe, ProbeUnavailable, StaticProbe, VirtualProbe
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec

__all__ = [
    "Admission",
    "BaseEngine",
    "BatchTooLargeError",
    "ContextBlock",
    "ContextMechanism",
    "ContextMemoryUnavailable",
    "EbbError",
    "EbbInternalError",
    "Engine",
    "EngineClosedError",
    "EngineDescription",
    "EngineLoadError",
    "EngineStats",
    "GpuPressure",
    "InputDtypeError",
    "InputShapeError",
    "InputValueError",
    "InvalidInputError",
    "MemoryMode",
    "MissingInputError",
    "NvmlProbe",
    "PlanIncompatibleError",
    "PressureProbe",
    "ProbeUnavailable",
    "ShapeProfile",
    "SharedBudget",
    "StaticProbe",
    "StatsSnapshot",
    "TensorSpec",
    "UnboundedAdmission",
    "UnknownInputError",
    "VirtualProbe",
]
