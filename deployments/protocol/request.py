"""Requests of the Open Inference Protocol (KServe v2 REST): bytes and headers in, checked arrays out.

The HTTP ingress gathers the body and headers and calls :func:`parse_infer_request`;
the gRPC service builds the same request object from its protobuf message and calls
:func:`parse_infer_object`. Nothing here imports Ray or a web framework, so every
rule of the protocol is unit-tested without a cluster.

Supported: JSON tensors (flat row-major ``data``, or nested exactly as the shape) and
Triton's binary tensor data extension (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data``, ``binary_data_output``), so
``tritonclient.http`` works unchanged. Not supported, and refused with a message:
``BYTES`` tensors, shared memory, classification outputs.

Every length, shape and count a client sends is checked against the body's own
size before an array is built, so a request can never make the server allocate
much more than the bytes it actually sent. Client data is only ever parsed as
JSON or copied as raw numbers; nothing is unpickled or evaluated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.protocol._json import (
    flatten,
    json_type,
    json_values_to_array,
    load_json,
    short,
)
from deployments.protocol.datatypes import (
    DATATYPES,
    datatype_for,
    has_bfloat16,
    itemsize,
    numpy_dtype,
)
from deployments.protocol.status import ProtocolError
from engine_runtime.errors import InputDtypeError, InputShapeError, MissingInputError
from engine_runtime.spec import EngineDescription, validate_inputs

__all__ = [
    "HEADER_LENGTH_HEADER",
    "CheckedInputs",
    "InferRequest",
    "RequestedOutput",
    "check_content_length",
    "parse_infer_object",
    "parse_infer_request",
]

#: The HTTP header telling how many leading body bytes are the JSON header
#: (Triton's binary tensor data extension).
HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"

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


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's ``outputs``."""

    name: str
    binary_data: bool | None
    """The output's ``binary_data`` parameter; None when the client did not say."""


@dataclass(frozen=True)
class CheckedInputs:
    """Named arrays that passed ``validate_inputs`` against one description, handed to a
    replica so that it does not check them again (``deployments.model``).

    ``finite_checked``: NaN and infinity were refused too; when False the replica (or
    its engine, on the device) still does that check, by the model's own rule.
    """

    arrays: dict[str, np.ndarray]
    validated_against: tuple
    """``validation_key`` of the description the arrays were checked against."""
    finite_checked: bool = False


def validation_key(desc: EngineDescription) -> tuple:
    """What ``validate_inputs`` reads of a description: two replicas of one model with
    equal keys accept exactly the same inputs."""
    return (desc.inputs, tuple(sorted(desc.profiles.items())))


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
    finite_checked: bool = True
    """Whether NaN and infinity were refused here (``reject_non_finite``)."""

    def wants_binary(self, output_name: str) -> bool:
        """Whether this output goes back as raw bytes after the JSON header."""
        for out in self.outputs:
            if out.name == output_name and out.binary_data is not None:
                return out.binary_data
        return self.binary_data_output

    def checked(self, desc: EngineDescription) -> CheckedInputs:
        """The inputs, marked as checked against ``desc``, for the replica."""
        return CheckedInputs(self.inputs, validation_key(desc), self.finite_checked)


def check_content_length(content_length: str | None, *, max_body_bytes: int) -> int | None:
    """Refuse a body by its declared ``Content-Length`` before reading it (413).

    Returns the declared length, or None for a missing or unparsable header: that
    is let through, and the size of the body actually read is checked again.
    """
    if content_length is None:
        return None
    text = content_length.strip()
    if not _DIGITS.fullmatch(text) or len(text) > _MAX_HEADER_LENGTH_DIGITS:
        return None
    declared = int(text)
    if declared > max_body_bytes:
        raise ProtocolError(413, f"request body is {declared} bytes, over the limit of {max_body_bytes} bytes")
    return declared


def parse_infer_request(
    body: bytes | bytearray | memoryview,
    *,
    content_type: str | None,
    header_length: str | None,
    desc: EngineDescription,
    max_body_bytes: int,
    reject_non_finite: bool = True,
) -> InferRequest:
    """Parse and check the body of ``POST /v2/models/{name}/infer``.

    ``header_length`` is the raw ``Inference-Header-Content-Length`` header (None when
    absent: the whole body is JSON). Binary tensors in a writable, aligned body (the
    ingress reads into a ``bytearray``) are views of it, not copies. Raises
    :class:`ProtocolError` (400, 413, 415) for a malformed request and an
    :class:`InvalidInputError` subclass for tensors the engine refuses; nothing else
    on any input.
    """
    if len(body) > max_body_bytes:
        raise ProtocolError(413, f"request body is {len(body)} bytes, over the limit of {max_body_bytes} bytes")
    _check_content_type(content_type)
    json_bytes = _parse_header_length(header_length, len(body))
    if json_bytes == 0:
        raise ProtocolError(400, "request body is empty; expected a JSON object with 'inputs'")
    view = memoryview(body)
    request = load_json(view[:json_bytes])
    return parse_infer_object(request, desc, json_bytes=json_bytes, binary_tail=view[json_bytes:],
                              binary_present=header_length is not None, reject_non_finite=reject_non_finite)


def parse_infer_object(
    request: Any,
    desc: EngineDescription,
    *,
    json_bytes: int,
    binary_tail: memoryview | None = None,
    binary_present: bool = False,
    raw_inputs: Sequence[bytes] | None = None,
    reject_non_finite: bool = True,
) -> InferRequest:
    """Check a decoded infer request (the JSON object) and build its arrays.

    Binary tensors come either from ``binary_tail`` (HTTP: the bytes after the JSON
    header, in input order, each ``binary_data_size`` long) or from ``raw_inputs``
    (gRPC's ``raw_input_contents``, one buffer per input, in input order).
    ``json_bytes`` bounds how many JSON elements the request can hold.
    """
    binary_tail = memoryview(b"") if binary_tail is None else binary_tail
    if not isinstance(request, dict):
        raise ProtocolError(400, f"request body must be a JSON object, got {json_type(request)}")
    _reject_unknown_keys(request, _REQUEST_KEYS, "request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, f"'id' must be a string, got {json_type(request_id)}")
    parameters = _parameters_of(request, "request")
    binary_data_output = bool(_bool_parameter(parameters, "binary_data_output", "request", default=False))

    raw_list = request.get("inputs")
    if not isinstance(raw_list, list) or not raw_list:
        raise ProtocolError(400, f"'inputs' must be a non-empty list of tensors; this model's inputs are {desc.input_names}")
    if raw_inputs is not None and len(raw_inputs) != len(raw_list):
        raise ProtocolError(400, f"raw_input_contents has {len(raw_inputs)} buffers for {len(raw_list)} inputs; "
                                 f"send one per input, in the order of 'inputs'")

    # First pass: every declaration checked, no tensor data touched.
    plans: dict[str, _InputPlan] = {}
    binary_offset = 0
    for index, raw in enumerate(raw_list):
        plan = _plan_input(raw, index, desc, json_bytes)
        if plan.name in plans:
            raise ProtocolError(400, f"input {plan.name!r} appears more than once")
        if raw_inputs is not None:
            plan.raw = memoryview(raw_inputs[index])
        elif plan.binary_size is not None:
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
            plan.raw = binary_tail[binary_offset: binary_offset + plan.binary_size]
            binary_offset += plan.binary_size
        plans[plan.name] = plan
    if raw_inputs is None and binary_offset != len(binary_tail):
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
    arrays = {name: _build_array(plans[name]) for name in desc.input_names}
    validate_inputs(desc, arrays, reject_non_finite=reject_non_finite)
    return InferRequest(id=request_id, inputs=arrays, outputs=outputs, binary_data_output=binary_data_output,
                        finite_checked=reject_non_finite)


@dataclass
class _InputPlan:
    name: str
    numpy_name: str
    shape: tuple[int, ...]
    count: int
    data: Any
    binary_size: int | None
    raw: memoryview | None = None


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


def _reject_unknown_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(400, f"unknown key(s) {unknown} in {where}; allowed keys are {sorted(allowed)}")


def _parameters_of(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"'parameters' of {where} must be an object, got {json_type(parameters)}")
    for key in _SHARED_MEMORY_KEYS:
        if key in parameters:
            raise ProtocolError(400, f"{where}: shared memory ({key!r}) is not supported by this server")
    return parameters


def _bool_parameter(parameters: dict[str, Any], key: str, where: str, *, default: bool | None) -> bool | None:
    value = parameters.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(400, f"parameter {key!r} of {where} must be true or false, got {json_type(value)}")
    return value


def _plan_input(raw: Any, index: int, desc: EngineDescription, json_bytes: int) -> _InputPlan:
    if not isinstance(raw, dict):
        raise ProtocolError(400, f"inputs[{index}] must be an object, got {json_type(raw)}")
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
    if numpy_name == "bfloat16" and not has_bfloat16():
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
        size = itemsize(numpy_name)
        if count * size != binary_size:
            raise ProtocolError(
                400,
                f"{where}: shape {list(shape)} of {datatype} needs {count} x {size} = {count * size} bytes, "
                f"but binary_data_size is {binary_size}",
            )
    else:
        if "data" not in raw:
            raise ProtocolError(400, f"{where} has neither 'data' nor a binary_data_size parameter")
        if not isinstance(data, list):
            raise ProtocolError(400, f"{where}: 'data' must be a list (flat or nested), got {json_type(data)}")
        capacity = (json_bytes + 1) // _MIN_JSON_BYTES_PER_ELEMENT
        if count > capacity:
            raise ProtocolError(
                400,
                f"{where}: shape {short(shape)} has {count} elements, more than a {json_bytes}-byte JSON body can hold",
            )
    return _InputPlan(name=name, numpy_name=numpy_name, shape=shape, count=count, data=data, binary_size=binary_size)


def _parse_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise ProtocolError(400, f"{where} needs 'shape', a list of non-negative integers, got {json_type(shape)}")
    if any(type(d) is float for d in shape):
        # orjson reads an integer literal past 64 bits as a float: the client wrote an
        # integer, and its size is what the checks below must report.
        shape = [int(d) if type(d) is float and d.is_integer() and abs(d) >= 2**64 else d for d in shape]
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise ProtocolError(400, f"{where}: shape must hold integers, got {json_type(d)} in {short(shape)}")
        if d < 0:
            raise ProtocolError(400, f"{where}: shape {short(shape)} has a negative dimension")
    return tuple(shape)


def _build_array(plan: _InputPlan) -> np.ndarray:
    dtype = numpy_dtype(plan.numpy_name)
    if plan.raw is not None:
        raw = plan.raw
        if len(raw) != plan.count * itemsize(plan.numpy_name):
            raise ProtocolError(
                400, f"input {plan.name!r}: shape {short(plan.shape)} of {datatype_for(plan.numpy_name)} needs "
                     f"{plan.count * itemsize(plan.numpy_name)} bytes, its raw contents are {len(raw)} bytes")
        wire = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=plan.count)
        if plan.numpy_name == "bool" and plan.count and int(wire.view(np.uint8).max()) > 1:
            raise ProtocolError(400, f"input {plan.name!r}: BOOL bytes must be 0 or 1")
        if wire.flags.writeable and wire.flags.aligned and wire.dtype == dtype:
            # Zero-copy: a view of the body the ingress read into a bytearray; it lives
            # as long as the request.
            return wire.reshape(plan.shape)
        # Read-only bytes (or a big-endian host): an aligned, writable copy the engine may keep.
        return wire.astype(dtype, copy=True).reshape(plan.shape)
    flat = flatten(plan.data, plan.shape, plan.name)
    return json_values_to_array(flat, plan.name, plan.numpy_name).reshape(plan.shape)


def _parse_requested_outputs(raw_outputs: Any, desc: EngineDescription) -> tuple[RequestedOutput, ...]:
    if raw_outputs is None:
        return ()
    if not isinstance(raw_outputs, list):
        raise ProtocolError(400, f"'outputs' must be a list, got {json_type(raw_outputs)}")
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


