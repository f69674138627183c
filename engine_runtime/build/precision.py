"""The floating-point type an engine is built to compute in (``Precision``)."""

from __future__ import annotations

import enum
from typing import Any

from engine_runtime.errors import EngineBuildError


class Precision(str, enum.Enum):
    """The floating-point type an engine computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise EngineBuildError(f"unknown precision {value!r}; expected one of {[p.value for p in cls]}") from None

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[self]


#: ONNX TensorProto element types of the floating-point kinds we build.
_ONNX_FLOAT_TYPES = {1: Precision.FP32, 10: Precision.FP16, 16: Precision.BF16}
