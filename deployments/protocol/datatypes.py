"""The two vocabularies of tensor element types: KServe v2 datatypes and numpy's.

The one place they meet; the request parser, the response encoder, the model
configuration and the gRPC service all read this table.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

try:
    # numpy has no bfloat16; ml_dtypes adds it (tritonclient itself needs it for BF16).
    # Not a hard dependency: without it BF16 tensors are refused with a message.
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None

__all__ = ["DATATYPES", "DATATYPE_OF", "datatype_for", "has_bfloat16", "itemsize", "numpy_dtype"]

#: KServe v2 datatype -> numpy dtype name. ``BYTES`` is absent on purpose: Ebb's
#: engines take numeric tensors only.
DATATYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
#: numpy dtype name -> KServe v2 datatype.
DATATYPE_OF: Mapping[str, str] = {numpy_name: datatype for datatype, numpy_name in DATATYPES.items()}


def datatype_for(numpy_name: str) -> str:
    """The KServe datatype of a numpy dtype name ("float32" -> "FP32")."""
    try:
        return DATATYPE_OF[numpy_name]
    except KeyError:
        raise ValueError(f"numpy dtype {numpy_name!r} has no KServe datatype; known: {sorted(DATATYPE_OF)}") from None


def has_bfloat16() -> bool:
    return _ml_dtypes is not None


def itemsize(numpy_name: str) -> int:
    return 2 if numpy_name == "bfloat16" else np.dtype(numpy_name).itemsize


def numpy_dtype(numpy_name: str) -> np.dtype:
    if numpy_name == "bfloat16":
        return np.dtype(_ml_dtypes.bfloat16)
    return np.dtype(numpy_name)
