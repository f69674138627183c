"""Engine backends: PyTorch (any host) and TensorRT / TensorRT-RTX.

The engine classes are imported on first use: each backend pulls in its own heavy
libraries (torch, tensorrt), which a caller of the other need not load.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PyTorchEngine", "TensorRTEngine"]

_HOMES = {"PyTorchEngine": "engine_runtime.backends.pytorch", "TensorRTEngine": "engine_runtime.backends.tensorrt"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
