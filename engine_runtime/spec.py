"""What an engine accepts and returns: tensor specs, shape profiles, input checks.

Pure data and pure functions; every backend describes itself with these types and
every caller's tensors are checked against them before anything touches a device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine_runtime.errors import (
    BatchTooLargeError,
    InputDtypeError,
    InputShapeError,
    InputValueError,
    InvalidInputError,
    MissingInputError,
    UnknownInputError,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "EngineDescription",
    "ShapeProfile",
    "TensorSpec",
    "batch_of",
    "dtype_name",
    "nbytes_of",
    "validate_inputs",
]


#: dtypes an engine may declare, by numpy name.
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile for one input: the smallest, typical and largest shape."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile ranks differ: min {self.min}, opt {self.opt}, max {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (1 <= lo <= mid <= hi):
                raise ValueError(f"profile must satisfy 1 <= min <= opt <= max per dim, got {self.min}/{self.opt}/{self.max}")

    @property
    def max_batch(self) -> int:
        return self.max[0]

    def describe(self) -> str:
        return "[" + ", ".join(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in zip(self.min, self.max)) + "]"

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; ``-1`` in ``shape`` marks a dimension the profile bounds."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: Integer inputs only: the smallest and largest value the model accepts, both
    #: included (token ids index an embedding; one outside it fails the call, and on a
    #: GPU an out-of-range index is a device-side assert that poisons the CUDA context).
    value_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} not in {SUPPORTED_DTYPES}")
        if self.value_range is not None and (np.dtype(self.dtype).kind not in "iu"
                                             or self.value_range[0] > self.value_range[1]):
            raise ValueError(f"tensor {self.name!r}: value_range {self.value_range} needs an integer dtype "
                             f"and low <= high, got {self.dtype}")

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        return d


@dataclass(frozen=True)
class EngineDescription:
    """Everything a caller may know about an engine without running it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: Mapping[str, ShapeProfile]
    weights_bytes: int
    backend: str
    platform: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def max_batch(self) -> int:
        return min(p.max_batch for p in self.profiles.values())

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise UnknownInputError(name, self.input_names)

    def opt_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: p.opt for name, p in self.profiles.items()}

    def max_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: p.max for name, p in self.profiles.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "platform": self.platform,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profiles": {k: v.to_dict() for k, v in self.profiles.items()},
            "weights_bytes": self.weights_bytes,
            "max_batch": self.max_batch,
        }


def dtype_name(tensor: Any) -> str:
    """The numpy-style dtype name of a numpy array or torch tensor."""
    if isinstance(tensor, np.ndarray):
        return str(tensor.dtype)
    # torch.float32 -> "float32"; imported lazily so the checks stay cheap to import.
    return str(tensor.dtype).removeprefix("torch.")


def validate_inputs(
    desc: EngineDescription,
    inputs: Mapping[str, Any],
    *,
    reject_non_finite: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Check named tensors against the engine; return their shapes.

    Raises a subclass of :class:`InvalidInputError` naming the input, what was
    expected and what came. Nothing here touches a device.
    """
    if not isinstance(inputs, Mapping):
        raise InvalidInputError(f"inputs must be a mapping of name to tensor, got {type(inputs).__name__}")
    for name in inputs:
        if name not in desc.profiles:
            raise UnknownInputError(str(name), desc.input_names)
    missing = [n for n in desc.input_names if n not in inputs]
    if missing:
        raise MissingInputError(missing)
    shapes: dict[str, tuple[int, ...]] = {}
    batch: int | None = None
    for spec in desc.inputs:
        tensor = inputs[spec.name]
        if not hasattr(tensor, "shape") or not hasattr(tensor, "dtype"):
            raise InvalidInputError(f"input {spec.name!r}: expected a numpy array or torch tensor, got {type(tensor).__name__}")
        got_dtype = dtype_name(tensor)
        if got_dtype != spec.dtype:
            raise InputDtypeError(spec.name, spec.dtype, got_dtype)
        shape = tuple(int(d) for d in tensor.shape)
        profile = desc.profiles[spec.name]
        if len(shape) != len(profile.min):
            raise InputShapeError(spec.name, profile.describe(), shape, f"rank {len(shape)}, expected {len(profile.min)}")
        if shape[0] > profile.max[0]:
            raise BatchTooLargeError(spec.name, profile.max[0], shape)
        for axis, (d, lo, hi) in enumerate(zip(shape, profile.min, profile.max)):
            if not lo <= d <= hi:
                raise InputShapeError(spec.name, profile.describe(), shape, f"dim {axis} is {d}, allowed {lo}..{hi}")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise InputShapeError(spec.name, f"batch {batch} like the other inputs", shape)
        if reject_non_finite and spec.dtype in ("float32", "float16", "bfloat16"):
            if not _all_finite(tensor):
                raise InputValueError(spec.name, "contains NaN or infinity")
        if spec.value_range is not None and math.prod(shape):
            lo, hi = int(tensor.min()), int(tensor.max())
            if lo < spec.value_range[0] or hi > spec.value_range[1]:
                raise InputValueError(spec.name, f"values must lie in {spec.value_range[0]}..{spec.value_range[1]}, "
                                                 f"got {lo}..{hi}")
        shapes[spec.name] = shape
    return shapes


def _all_finite(tensor: Any) -> bool:
    if isinstance(tensor, np.ndarray):
        return bool(np.isfinite(tensor).all())
    import torch

    return bool(torch.isfinite(tensor).all())


def batch_of(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return next(iter(shapes.values()))[0]


def nbytes_of(shape: tuple[int, ...], dtype: str) -> int:
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    return math.prod(shape) * itemsize
