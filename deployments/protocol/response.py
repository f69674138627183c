"""Answers of the Open Inference Protocol: model metadata and infer responses."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deployments.protocol._json import dumps
from deployments.protocol.datatypes import DATATYPE_OF, datatype_for
from deployments.protocol.request import HEADER_LENGTH_HEADER, InferRequest
from engine_runtime.errors import EbbInternalError
from engine_runtime.spec import EngineDescription, TensorSpec

__all__ = ["checked_outputs", "encode_infer_response", "little_endian_bytes", "model_metadata", "model_statistics"]


def model_metadata(desc: EngineDescription, versions: Sequence[str] = ()) -> dict[str, Any]:
    """The body of ``GET /v2/models/{name}``: tensors with datatype and shape (-1 is dynamic)."""
    body: dict[str, Any] = {"name": desc.name}
    if versions:
        body["versions"] = [str(v) for v in versions]
    # desc.platform holds the device a backend runs on; the protocol's "platform"
    # means the kind of model, which for Ebb is the backend.
    body["platform"] = desc.backend
    body["inputs"] = [_tensor_metadata(t) for t in desc.inputs]
    body["outputs"] = [_tensor_metadata(t) for t in desc.outputs]
    return body


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype_for(spec.dtype), "shape": [int(d) for d in spec.shape]}


def checked_outputs(outputs: Mapping[str, Any], names: Sequence[str]) -> list[tuple[str, np.ndarray, str]]:
    """``(name, array, datatype)`` of the outputs ``names``, refusing what an engine must never return."""
    checked = []
    for name in names:
        if name not in outputs:
            raise EbbInternalError(f"engine returned no output {name!r}; it returned {sorted(outputs)}")
        array = outputs[name]
        if not isinstance(array, np.ndarray):
            raise EbbInternalError(f"output {name!r} is a {type(array).__name__}, expected a numpy array")
        numpy_name = str(array.dtype)
        if numpy_name not in DATATYPE_OF:
            raise EbbInternalError(f"output {name!r} has dtype {numpy_name}, which has no KServe datatype")
        checked.append((name, array, DATATYPE_OF[numpy_name]))
    return checked


def little_endian_bytes(array: np.ndarray) -> bytes:
    """An array's elements as the wire carries them: contiguous, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model_name: str,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest,
    model_version: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers answering ``request`` with the engine's ``outputs``.

    Outputs the client asked for in binary follow the JSON header as raw
    little-endian bytes, and ``Inference-Header-Content-Length`` says where the
    header ends; otherwise the whole body is JSON.
    """
    names = [o.name for o in request.outputs] if request.outputs else list(outputs)
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = str(model_version)
    if request.id is not None:
        header["id"] = request.id
    tensors: list[dict[str, Any]] = []
    tails: list[bytes] = []
    non_finite = False
    for name, array, datatype in checked_outputs(outputs, names):
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.wants_binary(name):
            raw = little_endian_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            # orjson writes a contiguous numpy array at C speed (no Python list per element).
            values = array.astype(np.float32) if datatype == "BF16" else array
            tensor["data"] = np.ascontiguousarray(values).ravel()
            non_finite = non_finite or (values.dtype.kind == "f" and not bool(np.isfinite(values).all()))
        tensors.append(tensor)
    header["outputs"] = tensors
    if non_finite:
        # orjson would write NaN and infinity as null; the json module writes the NaN and
        # Infinity literals that the request side (and tritonclient) read back as numbers.
        for tensor in tensors:
            if "data" in tensor:
                tensor["data"] = tensor["data"].tolist()
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    else:
        header_bytes = dumps(header)
    if not tails:
        return header_bytes, {"Content-Type": "application/json"}
    return b"".join([header_bytes, *tails]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH_HEADER: str(len(header_bytes)),
    }


def model_statistics(name: str, version: str, *, success_count: int, success_ns: int, fail_count: int,
                     inference_count: int, last_inference_ms: int) -> dict[str, Any]:
    """One model's entry of Triton's statistics extension (``GET /v2/models/{name}/stats``).

    Counted at the ingress: a success's time is the whole call (queue, batching and
    the engine together), so ``compute_infer`` carries it and the finer splits' times
    are 0. Their *counts* are not: every successful request passed one queue and one
    compute of each kind, as in Triton, and Triton's tools rely on it. perf_analyzer,
    asked for no version, takes the version whose ``queue.count`` grew during its
    window ("failed to find the requested model version" otherwise, seen on an H200),
    and refuses stats whose compute_input, compute_infer and compute_output counts
    differ ("Server side statistics compute counts must be the same").
    """
    zero = {"count": 0, "ns": 0}
    success = {"count": int(success_count), "ns": int(success_ns)}
    counted = {"count": int(success_count), "ns": 0}
    return {
        "name": name, "version": version, "last_inference": int(last_inference_ms),
        "inference_count": int(inference_count), "execution_count": int(success_count),
        "inference_stats": {"success": success, "fail": {"count": int(fail_count), "ns": 0},
                            "queue": dict(counted), "compute_input": dict(counted), "compute_infer": success,
                            "compute_output": dict(counted), "cache_hit": zero, "cache_miss": zero},
        "batch_stats": [],
    }
