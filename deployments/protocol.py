"""The Open Inference Protocol (KServe v2 REST) as plain functions over bytes and dicts.

The HTTP ingress gathers the body and headers, calls :func:`parse_infer_request`,
runs the engine, and answers with :func:`encode_infer_response`, or with
:func:`http_status_for` and :func:`error_body` when anything raised. Nothing here
imports Ray or a web framework, so every rule of the protocol is unit-tested
without a cluster.

Supported: JSON tensors (flat or nested ``data``) and Triton's binary tensor data
extension (``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data``, ``binary_data_output``), so ``tritonclient.http`` works
unchanged. Not supported, and refused with a message: ``BYTES`` tensors, shared
memory, classification outputs.

Every length, shape and count a client sends is checked against the body's own
size before an array is built, so a request can never make the server allocate
much more than the bytes it actually sent. Client data is only ever parsed as
JSON or copied as raw numbers; nothing is unpickled or evaluated.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_runtime.errors import (
    ContextMemoryUnavailable,
    EbbError,
    EbbInternalError,
    EngineClosedError,
    InputDtypeError,
    InputShapeError,
    InvalidInputError,
    MissingInputError,
    UnknownInputError,
)
from engine_runtime.spec import EngineDescription, TensorSpec, validate_inputs

try:
    # numpy has no bfloat16; ml_dtypes adds it (tritonclient itself needs it for BF16).
    # Not a hard dependency: without it BF16 tensors are refused with a message.
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH_HEADER",
    "InferRequest",
    "ModelNotFound",
    "ProtocolError",
    "RequestedOutput",
    "check_content_length",
    "datatype_for",
    "encode_infer_response",
    "error_body",
    "http_status_for",
    "model_metadata",
    "parse_infer_request",
]

logger = logging.getLogger(__name__)

#: The HTTP header telling how many leading body bytes are the JSON header
#: (Triton's binary tensor data extension).
HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"

#: KServe v2 datatype -> numpy dtype name; the one place the two vocabularies meet.
#: ``BYTES`` is absent on purpose: Ebb's engines take numeric tensors only.
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
_DATATYPE_OF = {numpy_name: datatype for datatype, numpy_name in DATATYPES.items()}

#: Media types accepted on an infer request. None (no header) is accepted too:
#: tritonclient.http sends no Content-Type at all.
_ACCEPTED_CONTENT_TYPES = ("application/json", "application/octet-stream")

_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

#: The shortest JSON a number can take inside an array is one digit plus a comma,
#: so a JSON header of n bytes holds at most (n + 1) // 2 elements.
_MIN_JSON_BYTES_PER_ELEMENT = 2
#: int() of a very long digit string is slow and raises past 4300 digits; a real
#: header length has at most 20 digits.
_MAX_HEADER_LENGTH_DIGITS = 20
_DIGITS = re.compile(r"[0-9]+")
#: Bounds on Retry-After: at least a second (RFC 9110 counts whole seconds), and not
#: so long that a client gives up on a replica that frees memory in a moment.
_MIN_RETRY_AFTER_S = 1
_MAX_RETRY_AFTER_S = 30


class ProtocolError(EbbError):
    """A request the protocol layer refuses, with the HTTP status to answer it with."""

    def __init__(self, status_code: int, message: str):
        self.status_code = int(status_code)
        self.message = message
        super().__init__(message)


class ModelNotFound(ProtocolError):
    """The URL names a model (or version) this application does not serve."""

    def __init__(self, name: str, served: Sequence[str], version: str | None = None):
        self.name = name
        self.version = version
        self.served = sorted(served)
        what = f"model {name!r} version {version!r}" if version is not None else f"model {name!r}"
        super().__init__(404, f"unknown {what}; served models are {self.served}")


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's ``outputs``."""

    name: str
    binary_data: bool | None
    """The output's ``binary_data`` parameter; None when the client did not say."""


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: named arrays that passed ``validate_inputs``."""

    id: str | None
    """Echoed in the response when present."""
    inputs: dict[str, np.ndarray]
    """In the engine's input order."""
    outputs: tuple[RequestedOutput, ...]
    """The outputs asked for, in the client's order; empty means all of them."""
    binary_data_output: bool
    """The request-level ``binary_data_output`` parameter: the default for outputs
    that do not set ``binary_data`` themselves."""

    def wants_binary(self, output_name: str) -> bool:
        """Whether this output goes back as raw bytes after the JSON header."""
        for out in self.outputs:
            if out.name == output_name and out.binary_data is not None:
                return out.binary_data
        return self.binary_data_output


def datatype_for(numpy_name: str) -> str:
    """The KServe datatype of a numpy dtype name ("float32" -> "FP32")."""
    try:
        return _DATATYPE_OF[numpy_name]
    except KeyError:
        raise ValueError(f"numpy dtype {numpy_name!r} has no KServe datatype; known: {sorted(_DATATYPE_OF)}") from None


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


def check_content_length(content_length: str | None, *, max_body_bytes: int) -> None:
    """Refuse a body by its declared ``Content-Length`` before reading it (413).

    A missing or unparsable header is let through: the size of the body actually
    read is checked again by :func:`parse_infer_request`.
    """
    if content_length is None:
        return
    text = content_length.strip()
    if _DIGITS.fullmatch(text) and len(text) <= _MAX_HEADER_LENGTH_DIGITS and int(text) > max_body_bytes:
        raise ProtocolError(413, f"request body is {int(text)} bytes, over the limit of {max_body_bytes} bytes")


def parse_infer_request(
    body: bytes,
    *,
    content_type: str | None,
    header_length: str | None,
    desc: EngineDescription,
    max_body_bytes: int,
) -> InferRequest:
    """Parse and check the body of ``POST /v2/models/{name}/infer``.

    ``header_length`` is the raw ``Inference-Header-Content-Length`` header (None when
    absent: the whole body is JSON). Raises :class:`ProtocolError` (400, 413, 415) for
    a malformed request and an :class:`InvalidInputError` subclass for tensors the
    engine refuses; nothing else on any input.
    """
    if len(body) > max_body_bytes:
        raise ProtocolError(413, f"request body is {len(body)} bytes, over the limit of {max_body_bytes} bytes")
    _check_content_type(content_type)
    json_bytes = _parse_header_length(header_length, len(body))
    if json_bytes == 0:
        raise ProtocolError(400, "request body is empty; expected a JSON object with 'inputs'")
    request = _load_json(body[:json_bytes])
    binary_tail = memoryview(body)[json_bytes:]
    binary_present = header_length is not None

    if not isinstance(request, dict):
        raise ProtocolError(400, f"request body must be a JSON object, got {_json_type(request)}")
    _reject_unknown_keys(request, _REQUEST_KEYS, "request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters_of(request, "request")
    binary_data_output = bool(_bool_parameter(parameters, "binary_data_output", "request", default=False))

    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(400, f"'inputs' must be a non-empty list of tensors; this model's inputs are {desc.input_names}")

    # First pass: every declaration checked, no tensor data touched.
    plans: dict[str, _InputPlan] = {}
    binary_offset = 0
    for index, raw in enumerate(raw_inputs):
        plan = _plan_input(raw, index, desc, json_bytes)
        if plan.name in plans:
            raise ProtocolError(400, f"input {plan.name!r} appears more than once")
        if plan.binary_size is not None:
            if not binary_present and plan.binary_size > 0:
                raise ProtocolError(
                    400,
                    f"input {plan.name!r} has binary_data_size {plan.binary_size} but the request has no "
                    f"{HEADER_LENGTH_HEADER} header, so the whole body was read as JSON",
                )
            if binary_offset + plan.binary_size > len(binary_tail):
                raise ProtocolError(
                    400,
                    f"input {plan.name!r}: binary_data_size {plan.binary_size} at offset {binary_offset} runs past "
                    f"the {len(binary_tail)} bytes that follow the {json_bytes}-byte JSON header",
                )
            plan.binary_offset = binary_offset
            binary_offset += plan.binary_size
        plans[plan.name] = plan
    if binary_offset != len(binary_tail):
        raise ProtocolError(
            400,
            f"{len(binary_tail) - binary_offset} bytes follow the JSON header that no input's binary_data_size "
            f"accounts for ({HEADER_LENGTH_HEADER} says the header is {json_bytes} bytes)",
        )
    missing = [name for name in desc.input_names if name not in plans]
    if missing:
        raise MissingInputError(missing)

    outputs = _parse_requested_outputs(request.get("outputs"), desc)

    # Second pass: build arrays, each bounded by the bytes that carried it.
    arrays = {name: _build_array(plans[name], binary_tail) for name in desc.input_names}
    validate_inputs(desc, arrays)
    return InferRequest(id=request_id, inputs=arrays, outputs=outputs, binary_data_output=binary_data_output)


@dataclass
class _InputPlan:
    name: str
    numpy_name: str
    shape: tuple[int, ...]
    count: int
    data: Any
    binary_size: int | None
    binary_offset: int = 0


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "" or media_type in _ACCEPTED_CONTENT_TYPES:
        return
    raise ProtocolError(
        415,
        f"content type {content_type!r} is not accepted; send {' or '.join(_ACCEPTED_CONTENT_TYPES)} "
        f"(binary tensors: a JSON header plus {HEADER_LENGTH_HEADER})",
    )


def _parse_header_length(header_length: str | None, body_bytes: int) -> int:
    if header_length is None:
        return body_bytes
    text = header_length.strip()
    if not _DIGITS.fullmatch(text) or len(text) > _MAX_HEADER_LENGTH_DIGITS:
        raise ProtocolError(400, f"{HEADER_LENGTH_HEADER} must be a non-negative integer, got {header_length[:40]!r}")
    value = int(text)
    if value > body_bytes:
        raise ProtocolError(400, f"{HEADER_LENGTH_HEADER} is {value} but the body is only {body_bytes} bytes")
    return value


def _load_json(raw: bytes | memoryview) -> Any:
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError(400, f"request JSON is not valid UTF-8 at byte {err.start}") from err
    try:
        # NaN and Infinity literals are let through so that the engine layer's check
        # can name the input that holds them.
        return json.loads(text)
    except RecursionError as err:
        raise ProtocolError(400, "request JSON is nested too deeply") from err
    except ValueError as err:  # JSONDecodeError, or an integer literal too long to convert
        raise ProtocolError(400, f"malformed JSON in request body: {err}") from err


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _reject_unknown_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(400, f"unknown key(s) {unknown} in {where}; allowed keys are {sorted(allowed)}")


def _parameters_of(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"'parameters' of {where} must be an object, got {_json_type(parameters)}")
    for key in _SHARED_MEMORY_KEYS:
        if key in parameters:
            raise ProtocolError(400, f"{where}: shared memory ({key!r}) is not supported by this server")
    return parameters


def _bool_parameter(parameters: dict[str, Any], key: str, where: str, *, default: bool | None) -> bool | None:
    value = parameters.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(400, f"parameter {key!r} of {where} must be true or false, got {_json_type(value)}")
    return value


def _plan_input(raw: Any, index: int, desc: EngineDescription, json_bytes: int) -> _InputPlan:
    if not isinstance(raw, dict):
        raise ProtocolError(400, f"inputs[{index}] must be an object, got {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise ProtocolError(400, f"inputs[{index}] needs a string 'name'; this model's inputs are {desc.input_names}")
    where = f"input {name!r}"
    _reject_unknown_keys(raw, _INPUT_KEYS, where)
    spec = desc.input(name)  # UnknownInputError lists the valid names

    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise ProtocolError(400, f"{where} needs a string 'datatype', e.g. {datatype_for(spec.dtype)!r}")
    if datatype == "BYTES":
        raise ProtocolError(400, f"{where}: datatype BYTES is not supported; this model takes {datatype_for(spec.dtype)}")
    if datatype not in DATATYPES:
        raise ProtocolError(400, f"{where}: unknown datatype {datatype!r}; known datatypes are {sorted(DATATYPES)}")
    expected = datatype_for(spec.dtype)
    if datatype != expected:
        raise InputDtypeError(name, expected, datatype)
    numpy_name = DATATYPES[datatype]
    if numpy_name == "bfloat16" and _ml_dtypes is None:
        raise ProtocolError(400, f"{where}: datatype BF16 needs the ml_dtypes package, which this server lacks")

    shape = _parse_shape(raw.get("shape"), where)
    profile = desc.profiles[name]
    if len(shape) != len(profile.min):
        # Checked here and not only by validate_inputs: numpy refuses arrays of more
        # than 64 dimensions, and no array should be built for a wrong rank anyway.
        raise InputShapeError(name, profile.describe(), shape, f"rank {len(shape)}, expected {len(profile.min)}")
    count = math.prod(shape)

    parameters = _parameters_of(raw, where)
    binary_size = parameters.get("binary_data_size")
    data = raw.get("data")
    if binary_size is not None:
        if isinstance(binary_size, bool) or not isinstance(binary_size, int) or binary_size < 0:
            raise ProtocolError(400, f"{where}: binary_data_size must be a non-negative integer, got {binary_size!r}")
        if "data" in raw:
            raise ProtocolError(400, f"{where} has both 'data' and binary_data_size; send one or the other")
        itemsize = _itemsize(numpy_name)
        if count * itemsize != binary_size:
            raise ProtocolError(
                400,
                f"{where}: shape {list(shape)} of {datatype} needs {count} x {itemsize} = {count * itemsize} bytes, "
                f"but binary_data_size is {binary_size}",
            )
    else:
        if "data" not in raw:
            raise ProtocolError(400, f"{where} has neither 'data' nor a binary_data_size parameter")
        if not isinstance(data, list):
            raise ProtocolError(400, f"{where}: 'data' must be a list (flat or nested), got {_json_type(data)}")
        capacity = (json_bytes + 1) // _MIN_JSON_BYTES_PER_ELEMENT
        if count > capacity:
            raise ProtocolError(
                400,
                f"{where}: shape {_short(shape)} has {count} elements, more than a {json_bytes}-byte JSON body can hold",
            )
    return _InputPlan(name=name, numpy_name=numpy_name, shape=shape, count=count, data=data, binary_size=binary_size)


def _parse_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise ProtocolError(400, f"{where} needs 'shape', a list of non-negative integers, got {_json_type(shape)}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise ProtocolError(400, f"{where}: shape must hold integers, got {_json_type(d)} in {_short(shape)}")
        if d < 0:
            raise ProtocolError(400, f"{where}: shape {_short(shape)} has a negative dimension")
    return tuple(shape)


def _short(shape: Sequence[Any], limit: int = 8) -> str:
    """A shape for a message, cut short: a client may send a thousand dimensions."""
    items = [str(d) if len(str(d)) <= 20 else str(d)[:20] + "..." for d in list(shape)[:limit]]
    return "[" + ", ".join(items) + (", ..." if len(shape) > limit else "") + "]"


def _itemsize(numpy_name: str) -> int:
    return 2 if numpy_name == "bfloat16" else np.dtype(numpy_name).itemsize


def _numpy_dtype(numpy_name: str) -> np.dtype:
    if numpy_name == "bfloat16":
        return np.dtype(_ml_dtypes.bfloat16)
    return np.dtype(numpy_name)


def _build_array(plan: _InputPlan, binary_tail: memoryview) -> np.ndarray:
    dtype = _numpy_dtype(plan.numpy_name)
    if plan.binary_size is not None:
        raw = binary_tail[plan.binary_offset: plan.binary_offset + plan.binary_size]
        # The wire is little-endian; astype copies into an aligned, writable array the
        # engine may keep, instead of a view pinning the whole request body.
        wire = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=plan.count)
        if plan.numpy_name == "bool" and plan.count and int(wire.view(np.uint8).max()) > 1:
            raise ProtocolError(400, f"input {plan.name!r}: BOOL bytes must be 0 or 1")
        return wire.astype(dtype, copy=True).reshape(plan.shape)
    flat = _flatten(plan.data, plan.name, plan.count)
    if len(flat) != plan.count:
        raise ProtocolError(
            400,
            f"input {plan.name!r}: shape {list(plan.shape)} needs {plan.count} elements, 'data' has {len(flat)}",
        )
    return _json_values_to_array(flat, plan).reshape(plan.shape)


def _flatten(data: list[Any], name: str, limit: int) -> list[Any]:
    """Row-major elements of flat or nested ``data``; stops once past ``limit``."""
    flat: list[Any] = []
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            if list in set(map(type, node)):
                stack.extend(reversed(node))
            else:
                flat.extend(node)  # a leaf row: copied at C speed
        else:
            flat.append(node)
        if len(flat) > limit:
            break  # the caller reports the count mismatch
    return flat


def _json_values_to_array(flat: list[Any], plan: _InputPlan) -> np.ndarray:
    where = f"input {plan.name!r}"
    kinds = set(map(type, flat))
    dtype = _numpy_dtype(plan.numpy_name)
    if plan.numpy_name == "bool":
        if not kinds <= {bool}:
            raise ProtocolError(400, f"{where}: BOOL data must be true or false, got {_kinds(kinds)}")
        return np.array(flat, dtype=bool)
    if dtype.kind in "iu":
        if not kinds <= {int}:
            raise ProtocolError(400, f"{where}: {datatype_for(plan.numpy_name)} data must be integers, got {_kinds(kinds)}")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise ProtocolError(
                400, f"{where}: values must lie in {info.min}..{info.max} for {datatype_for(plan.numpy_name)}"
            )
        return np.array(flat, dtype=dtype)
    if not kinds <= {int, float}:
        raise ProtocolError(400, f"{where}: {datatype_for(plan.numpy_name)} data must be numbers, got {_kinds(kinds)}")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError as err:
        raise ProtocolError(400, f"{where}: an integer in 'data' is too large for a float") from err
    # Values past the type's range become infinities, which validate_inputs reports.
    with np.errstate(over="ignore"):
        return wide.astype(dtype)


_JSON_KIND_NAMES = {type(None): "null", bool: "booleans", int: "integers", float: "floats", str: "strings",
                    list: "lists", dict: "objects"}


def _kinds(kinds: set[type]) -> str:
    return ", ".join(sorted(_JSON_KIND_NAMES.get(k, k.__name__) for k in kinds))


def _parse_requested_outputs(raw_outputs: Any, desc: EngineDescription) -> tuple[RequestedOutput, ...]:
    if raw_outputs is None:
        return ()
    if not isinstance(raw_outputs, list):
        raise ProtocolError(400, f"'outputs' must be a list, got {_json_type(raw_outputs)}")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError(400, f"outputs[{index}] must be an object with a string 'name'")
        name = raw["name"]
        where = f"output {name!r}"
        _reject_unknown_keys(raw, _OUTPUT_KEYS, where)
        if name not in desc.output_names:
            raise ProtocolError(400, f"unknown output {name!r}; this model's outputs are {desc.output_names}")
        if name in seen:
            raise ProtocolError(400, f"output {name!r} is requested more than once")
        seen.add(name)
        parameters = _parameters_of(raw, where)
        if parameters.get("classification"):
            raise ProtocolError(400, f"{where}: the classification extension is not supported by this server")
        outputs.append(RequestedOutput(name=name, binary_data=_bool_parameter(parameters, "binary_data", where, default=None)))
    return tuple(outputs)


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
    for name in names:
        if name not in outputs:
            raise EbbInternalError(f"engine returned no output {name!r}; it returned {sorted(outputs)}")
        array = outputs[name]
        if not isinstance(array, np.ndarray):
            raise EbbInternalError(f"output {name!r} is a {type(array).__name__}, expected a numpy array")
        numpy_name = str(array.dtype)
        if numpy_name not in _DATATYPE_OF:
            raise EbbInternalError(f"output {name!r} has dtype {numpy_name}, which has no KServe datatype")
        tensor: dict[str, Any] = {"name": name, "datatype": _DATATYPE_OF[numpy_name], "shape": list(array.shape)}
        if request.wants_binary(name):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            values = array.astype(np.float32) if numpy_name == "bfloat16" else array
            tensor["data"] = values.ravel().tolist()
        tensors.append(tensor)
    header["outputs"] = tensors
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not tails:
        return header_bytes, {"Content-Type": "application/json"}
    return b"".join([header_bytes, *tails]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH_HEADER: str(len(header_bytes)),
    }


def http_status_for(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """The HTTP status, message and extra headers answering a request that raised ``exc``.

    Client mistakes are 4xx, a lack of GPU memory in time (or a replica shutting
    down) is 503 with ``Retry-After``, and anything else is a bug: 500, logged here
    with its traceback, its details kept from the client.
    """
    if isinstance(exc, ProtocolError):
        return exc.status_code, exc.message, {}
    if isinstance(exc, InvalidInputError):
        return 400, str(exc), {}
    if isinstance(exc, ContextMemoryUnavailable):
        retry_after_s = min(_MAX_RETRY_AFTER_S, max(_MIN_RETRY_AFTER_S, math.ceil(exc.waited_s)))
        return 503, str(exc), {"Retry-After": str(retry_after_s)}
    if isinstance(exc, EngineClosedError):
        # Graceful shutdown closes the engine under requests still queued; Serve
        # routes the retry to another replica.
        return 503, str(exc), {"Retry-After": str(_MIN_RETRY_AFTER_S)}
    logger.error("internal error answering a request: %s", type(exc).__name__, exc_info=exc)
    return 500, "internal error", {}


def error_body(message: str) -> bytes:
    """The protocol's error body, ``{"error": message}``."""
    return json.dumps({"error": message}).encode("utf-8")
