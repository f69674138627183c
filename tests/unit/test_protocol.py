"""The Open Inference Protocol module: every client mistake, round trips, tritonclient, fuzzing.

No Ray, no web framework: bytes and headers in, arrays or (status, message) out.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.protocol import (
    DATATYPES,
    HEADER_LENGTH_HEADER,
    InferRequest,
    ModelNotFound,
    ProtocolError,
    RequestedOutput,
    check_content_length,
    datatype_for,
    encode_infer_response,
    error_body,
    http_status_for,
    model_metadata,
    parse_infer_request,
)
from engine_runtime.errors import (
    ContextMemoryUnavailable,
    EbbInternalError,
    EngineBrokenError,
    EngineClosedError,
    InvalidInputError,
)
from engine_runtime.spec import SUPPORTED_DTYPES, EngineDescription, ShapeProfile, TensorSpec

MAX_BODY_BYTES = 1 << 20

DEMO = EngineDescription(
    name="demo",
    inputs=(TensorSpec("x", "float32", (-1, 4)), TensorSpec("ids", "int64", (-1, 2))),
    outputs=(TensorSpec("y", "float32", (-1, 4)), TensorSpec("label", "int32", (-1,))),
    profiles={"x": ShapeProfile((1, 4), (2, 4), (8, 4)), "ids": ShapeProfile((1, 2), (2, 2), (8, 2))},
    weights_bytes=0,
    backend="pytorch",
    platform="cpu",
)
MASKED = EngineDescription(
    name="masked",
    inputs=(TensorSpec("m", "bool", (-1, 3)),),
    outputs=(TensorSpec("out", "bool", (-1, 3)),),
    profiles={"m": ShapeProfile((1, 3), (1, 3), (4, 3))},
    weights_bytes=0,
    backend="pytorch",
)


def _single_input_desc(dtype: str, rank: int) -> EngineDescription:
    return EngineDescription(
        name=f"t_{dtype}_{rank}",
        inputs=(TensorSpec("t", dtype, (-1,) * rank),),
        outputs=(TensorSpec("o", dtype, (-1,) * rank),),
        profiles={"t": ShapeProfile((1,) * rank, (2,) * rank, (4,) * rank)},
        weights_bytes=0,
        backend="pytorch",
    )


def _x(batch: int = 2) -> np.ndarray:
    return np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) / 8


def _ids(batch: int = 2) -> np.ndarray:
    return np.arange(batch * 2, dtype=np.int64).reshape(batch, 2) - 1


def _json_input(name: str, array: np.ndarray, datatype: str | None = None) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype or datatype_for(str(array.dtype)),
            "data": array.ravel().tolist()}


def _valid_json_request() -> dict[str, Any]:
    return {"id": "r1", "inputs": [_json_input("x", _x()), _json_input("ids", _ids())]}


def _binary_body(request: dict[str, Any], arrays: list[np.ndarray]) -> tuple[bytes, str]:
    """A binary-extension body: ``request``'s inputs get binary_data_size, arrays follow in order."""
    for tensor, array in zip(request["inputs"], arrays):
        tensor.pop("data", None)
        tensor.setdefault("parameters", {})["binary_data_size"] = array.nbytes
    header = json.dumps(request).encode()
    return header + b"".join(a.tobytes() for a in arrays), str(len(header))


def _parse(body: bytes, *, content_type: str | None = "application/json", header_length: str | None = None,
           desc: EngineDescription = DEMO, max_body_bytes: int = MAX_BODY_BYTES) -> InferRequest:
    return parse_infer_request(body, content_type=content_type, header_length=header_length, desc=desc,
                               max_body_bytes=max_body_bytes)


def _with(mutate: Callable[[dict[str, Any]], Any]) -> bytes:
    request = _valid_json_request()
    mutate(request)
    return json.dumps(request).encode()


def _set_input(index: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r["inputs"][index].update(fields)


def _binary_case(mutate: Callable[[dict[str, Any]], Any] = lambda r: None,
                 header_delta: int = 0, tail: bytes = b"", cut: int = 0) -> dict[str, Any]:
    """A valid binary-extension request, its JSON header changed by ``mutate``, its tail
    extended or cut, its header length off by ``header_delta``."""
    request, arrays = _valid_json_request(), [_x(), _ids()]
    body, header_length = _binary_body(request, arrays)
    mutate(request)
    header = json.dumps(request).encode()
    body = header + body[int(header_length):] + tail
    return {"body": body[: len(body) - cut], "header_length": str(len(header) + header_delta)}


def _masked_binary(tail: bytes) -> dict[str, Any]:
    tensor = {"name": "m", "shape": [1, len(tail)], "datatype": "BOOL", "parameters": {"binary_data_size": len(tail)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    return {"body": header + tail, "header_length": str(len(header)), "desc": MASKED}


def _binary_size(index: int, size: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r["inputs"][index]["parameters"].update(binary_data_size=size)


# (case id, parse kwargs, expected status, words the message must contain)
MISTAKES: list[tuple[str, dict[str, Any], int, list[str]]] = [
    ("malformed json", {"body": b'{"inputs": ['}, 400, ["malformed JSON"]),
    ("not utf-8", {"body": b'{"id": "\xff"}'}, 400, ["UTF-8"]),
    ("nested too deeply", {"body": b"[" * 200_000}, 400, ["nested too deeply"]),
    ("top level is a list", {"body": b"[1, 2]"}, 400, ["JSON object", "a list"]),
    ("empty body", {"body": b""}, 400, ["empty"]),
    ("wrong content type", {"body": _with(lambda r: None), "content_type": "text/plain"}, 415, ["text/plain"]),
    ("form content type", {"body": _with(lambda r: None), "content_type": "application/x-www-form-urlencoded"},
     415, ["application/x-www-form-urlencoded", "application/json"]),
    ("body over the limit", {"body": _with(lambda r: None), "max_body_bytes": 64}, 413, ["over the limit of 64"]),
    ("unknown top-level key", {"body": _with(lambda r: r.update(input=r.pop("inputs")))}, 400, ["'input'", "inputs"]),
    ("id not a string", {"body": _with(lambda r: r.update(id=7))}, 400, ["'id'"]),
    ("inputs missing", {"body": _with(lambda r: r.pop("inputs"))}, 400, ["'inputs'", "['x', 'ids']"]),
    ("inputs empty", {"body": _with(lambda r: r.update(inputs=[]))}, 400, ["'inputs'"]),
    ("input not an object", {"body": _with(lambda r: r["inputs"].append(3))}, 400, ["inputs[2]"]),
    ("input without a name", {"body": _with(lambda r: r["inputs"][0].pop("name"))}, 400, ["inputs[0]", "'name'"]),
    ("unknown input", {"body": _with(_set_input(0, name="z"))}, 400, ["'z'", "['x', 'ids']"]),
    ("unknown key in an input", {"body": _with(_set_input(0, dims=[2, 4]))}, 400, ["'dims'", "'x'"]),
    ("duplicated input", {"body": _with(lambda r: r["inputs"].append(_json_input("x", _x())))}, 400,
     ["'x'", "more than once"]),
    ("missing input", {"body": _with(lambda r: r["inputs"].pop(1))}, 400, ["missing", "'ids'"]),
    ("datatype mismatch", {"body": _with(_set_input(0, datatype="INT64"))}, 400, ["'x'", "FP32", "INT64"]),
    ("unknown datatype", {"body": _with(_set_input(0, datatype="FLOAT"))}, 400, ["'FLOAT'", "FP32"]),
    ("BYTES", {"body": _with(_set_input(0, datatype="BYTES"))}, 400, ["BYTES", "not supported"]),
    ("datatype missing", {"body": _with(lambda r: r["inputs"][0].pop("datatype"))}, 400, ["'x'", "datatype"]),
    ("shape missing", {"body": _with(lambda r: r["inputs"][0].pop("shape"))}, 400, ["'x'", "shape"]),
    ("negative shape", {"body": _with(_set_input(0, shape=[-2, 4]))}, 400, ["'x'", "negative"]),
    ("float in shape", {"body": _with(_set_input(0, shape=[2.5, 4]))}, 400, ["'x'", "integers"]),
    ("bool in shape", {"body": _with(_set_input(0, shape=[True, 4]))}, 400, ["'x'", "integers"]),
    ("huge shape", {"body": _with(_set_input(0, shape=[10**30, 4]))}, 400, ["'x'", "more than"]),
    ("overflowing shape", {"body": _with(_set_input(0, shape=[2**63, 2**63]))}, 400, ["'x'", "more than"]),
    ("wrong rank", {"body": _with(_set_input(0, shape=[2, 4, 1]))}, 400, ["'x'", "rank 3, expected 2"]),
    ("thousand-dimension shape", {"body": _with(_set_input(0, shape=[1] * 1000))}, 400, ["'x'", "rank 1000"]),
    ("zero-size shape", {"body": _with(_set_input(0, shape=[0, 4], data=[]))}, 400, ["'x'", "dim 0 is 0"]),
    ("data shorter than shape", {"body": _with(_set_input(0, data=list(range(7))))}, 400,
     ["'x'", "8 elements", "has 7"]),
    ("data longer than shape", {"body": _with(_set_input(0, data=list(range(9))))}, 400, ["'x'", "8 elements"]),
    ("data not a list", {"body": _with(_set_input(0, data="0,1,2"))}, 400, ["'x'", "'data' must be a list"]),
    ("strings in data", {"body": _with(_set_input(0, data=["a"] * 8))}, 400, ["'x'", "strings"]),
    ("booleans in float data", {"body": _with(_set_input(0, data=[True] * 8))}, 400, ["'x'", "booleans"]),
    ("floats in int data", {"body": _with(_set_input(1, data=[0.5] * 4))}, 400, ["'ids'", "integers", "floats"]),
    ("int out of INT64 range", {"body": _with(_set_input(1, data=[2**70, 0, 0, 0]))}, 400, ["'ids'", "INT64"]),
    ("int too large for a float", {"body": _with(_set_input(0, data=[10**400] + [0] * 7))}, 400, ["'x'"]),
    ("NaN", {"body": _with(_set_input(0, data=[float("nan")] + [0.0] * 7))}, 400, ["'x'", "NaN"]),
    ("infinity", {"body": _with(_set_input(0, data=[1e300 * 10] + [0.0] * 7))}, 400, ["'x'", "infinity"]),
    ("batch over the profile", {"body": _with(lambda r: r.update(
        inputs=[_json_input("x", _x(9)), _json_input("ids", _ids(9))]))}, 400, ["'x'", "maximum 8"]),
    ("batches disagree", {"body": _with(lambda r: r["inputs"].__setitem__(1, _json_input("ids", _ids(3))))}, 400,
     ["'ids'", "batch 2"]),
    ("no data at all", {"body": _with(lambda r: r["inputs"][0].pop("data"))}, 400, ["'x'", "neither"]),
    ("shared memory", {"body": _with(_set_input(0, parameters={"shared_memory_region": "r"}))}, 400,
     ["shared memory"]),
    ("binary_data_output not a bool", {"body": _with(lambda r: r.update(parameters={"binary_data_output": "yes"}))},
     400, ["binary_data_output"]),
    ("unknown output", {"body": _with(lambda r: r.update(outputs=[{"name": "q"}]))}, 400,
     ["'q'", "['y', 'label']"]),
    ("duplicated output", {"body": _with(lambda r: r.update(outputs=[{"name": "y"}, {"name": "y"}]))}, 400,
     ["'y'", "more than once"]),
    ("outputs not a list", {"body": _with(lambda r: r.update(outputs={"name": "y"}))}, 400, ["'outputs'"]),
    ("classification", {"body": _with(lambda r: r.update(
        outputs=[{"name": "y", "parameters": {"classification": 3}}]))}, 400, ["classification"]),
    ("binary_data not a bool", {"body": _with(lambda r: r.update(
        outputs=[{"name": "y", "parameters": {"binary_data": 1}}]))}, 400, ["binary_data", "'y'"]),
    # The binary tensor data extension.
    ("header length longer than body", _binary_case(header_delta=10_000), 400, [HEADER_LENGTH_HEADER, "only"]),
    ("header length cuts the JSON", _binary_case(header_delta=-5), 400, ["malformed JSON"]),
    ("header length past the JSON", _binary_case(header_delta=5), 400, ["malformed JSON"]),
    ("header length not a number", {**_binary_case(), "header_length": "abc"}, 400, ["non-negative integer"]),
    ("header length negative", {**_binary_case(), "header_length": "-3"}, 400, ["non-negative integer"]),
    ("header length fractional", {**_binary_case(), "header_length": "12.5"}, 400, ["non-negative integer"]),
    ("header length absurdly long", {**_binary_case(), "header_length": "9" * 5000}, 400,
     ["non-negative integer"]),
    ("header length zero", {**_binary_case(), "header_length": "0"}, 400, ["empty"]),
    ("trailing bytes", _binary_case(tail=b"\0" * 3), 400, ["3 bytes", "accounts for"]),
    ("binary tail cut short", _binary_case(cut=4), 400, ["'ids'", "runs past"]),
    ("binary size disagrees with shape", _binary_case(_binary_size(0, 31)), 400, ["'x'", "32", "31"]),
    ("binary size huge", _binary_case(_binary_size(1, 2**64)), 400, ["'ids'"]),
    ("binary size negative", _binary_case(_binary_size(0, -32)), 400, ["'x'", "non-negative"]),
    ("binary size a bool", _binary_case(_binary_size(0, True)), 400, ["'x'", "non-negative"]),
    ("binary size with data too", _binary_case(lambda r: r["inputs"][0].update(data=[0.0] * 8)), 400,
     ["'x'", "both"]),
    ("binary size without the header", {"body": _binary_case(cut=_x().nbytes + _ids().nbytes)["body"]}, 400,
     ["'x'", HEADER_LENGTH_HEADER]),
    ("binary huge shape", _binary_case(lambda r: r["inputs"][0].update(shape=[2**40, 4])), 400,
     ["'x'", "binary_data_size"]),
    ("binary BOOL not 0 or 1", _masked_binary(b"\x01\x02\x00"), 400, ["'m'", "0 or 1"]),
]


def _outcome(call: Callable[[], Any]) -> tuple[int, str, dict[str, str]]:
    try:
        call()
    except (ProtocolError, InvalidInputError) as exc:
        return http_status_for(exc)
    raise AssertionError("expected the request to be refused")


@pytest.mark.parametrize(("kwargs", "status", "words"), [c[1:] for c in MISTAKES], ids=[c[0] for c in MISTAKES])
def test_each_client_mistake_gets_its_status_and_names_the_culprit(kwargs, status, words):
    got_status, message, _ = _outcome(lambda: _parse(**kwargs))
    assert got_status == status, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_the_valid_request_behind_the_table_is_accepted():
    # Every mistake above is one change away from these, so each fails for its own reason.
    assert set(_parse(_with(lambda r: None)).inputs) == {"x", "ids"}
    assert set(_parse(**_binary_case()).inputs) == {"x", "ids"}


@pytest.mark.parametrize("content_type", [None, "", "application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/octet-stream"])
def test_accepted_content_types(content_type):
    assert _parse(_with(lambda r: None), content_type=content_type).id == "r1"


# --- error mapping ---------------------------------------------------------------------------------

def test_model_not_found_is_404_listing_served_models():
    status, message, headers = http_status_for(ModelNotFound("nope", ["resnet", "bert"]))
    assert (status, headers) == (404, {})
    assert "'nope'" in message and "['bert', 'resnet']" in message


@pytest.mark.parametrize(("waited_s", "retry_after"), [(0.0, "1"), (0.2, "1"), (2.5, "3"), (1e6, "30")])
def test_memory_unavailable_is_503_with_retry_after(waited_s, retry_after):
    status, message, headers = http_status_for(ContextMemoryUnavailable(64 << 20, 1 << 20, waited_s, "GPU 0"))
    assert status == 503
    assert headers == {"Retry-After": retry_after}
    assert "64.0 MiB" in message


def test_closed_engine_is_503():
    status, _, headers = http_status_for(EngineClosedError("demo"))
    assert status == 503 and int(headers["Retry-After"]) >= 1


def test_broken_engine_is_503_with_retry_after(caplog):
    # A sticky CUDA error poisoned the replica: Serve replaces it, the retry goes elsewhere.
    status, message, headers = http_status_for(
        EngineBrokenError("bert", "AcceleratorError: CUDA error: device-side assert triggered"))
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "'bert'" in message and "device-side assert" in message
    assert "internal error" not in caplog.text


@pytest.mark.parametrize("exc", [RuntimeError("secret path /opt/x"), EbbInternalError("bug"), ValueError("v"),
                                 KeyError("k")])
def test_anything_else_is_500_and_hides_details(exc, caplog):
    assert http_status_for(exc) == (500, "internal error", {})
    assert type(exc).__name__ in caplog.text


def test_error_body_is_the_protocol_shape():
    assert json.loads(error_body("input 'x': bad")) == {"error": "input 'x': bad"}


def test_content_length_checked_before_reading():
    with pytest.raises(ProtocolError) as err:
        check_content_length("2048", max_body_bytes=1024)
    assert err.value.status_code == 413
    for fine in (None, "1024", "junk", "-1"):
        check_content_length(fine, max_body_bytes=1024)


# --- metadata --------------------------------------------------------------------------------------

def test_model_metadata_follows_the_v2_spec():
    assert model_metadata(DEMO, versions=["1"]) == {
        "name": "demo",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                   {"name": "ids", "datatype": "INT64", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "label", "datatype": "INT32", "shape": [-1]}],
    }
    assert "versions" not in model_metadata(DEMO)


def test_every_engine_dtype_has_a_datatype():
    for numpy_name in SUPPORTED_DTYPES:
        assert DATATYPES[datatype_for(numpy_name)] == numpy_name
    with pytest.raises(ValueError, match="complex64"):
        datatype_for("complex64")


# --- round trips -----------------------------------------------------------------------------------

def test_json_round_trip_flat_and_nested():
    flat = _parse(_with(lambda r: None))
    nested = _parse(_with(lambda r: [t.update(data=np.asarray(t["data"]).reshape(t["shape"]).tolist())
                                     for t in r["inputs"]]))
    for parsed in (flat, nested):
        assert parsed.id == "r1"
        np.testing.assert_array_equal(parsed.inputs["x"], _x())
        np.testing.assert_array_equal(parsed.inputs["ids"], _ids())
        assert parsed.inputs["x"].dtype == np.float32 and parsed.inputs["ids"].dtype == np.int64
        assert parsed.outputs == () and not parsed.binary_data_output

    outputs = {"y": _x() * 2, "label": np.array([3, 4], dtype=np.int32)}
    body, headers = encode_infer_response("demo", outputs, flat, model_version="1")
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body) == {
        "model_name": "demo", "model_version": "1", "id": "r1",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 4], "data": (_x() * 2).ravel().tolist()},
                    {"name": "label", "datatype": "INT32", "shape": [2], "data": [3, 4]}],
    }


def test_binary_round_trip_and_requested_outputs():
    body, header_length = _binary_body(
        {"inputs": [_json_input("x", _x()), _json_input("ids", _ids())],
         "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "y"}]},
        [_x(), _ids()])
    parsed = _parse(body, content_type="application/octet-stream", header_length=header_length)
    np.testing.assert_array_equal(parsed.inputs["x"], _x())
    assert parsed.inputs["x"].flags.writeable and parsed.inputs["x"].flags.aligned
    assert parsed.outputs == (RequestedOutput("label", True), RequestedOutput("y", None))
    assert parsed.wants_binary("label") and not parsed.wants_binary("y")

    label = np.array([7, 8], dtype=np.int32)
    response, headers = encode_infer_response("demo", {"y": _x(), "label": label}, parsed)
    split = int(headers[HEADER_LENGTH_HEADER])
    header = json.loads(response[:split])
    assert [o["name"] for o in header["outputs"]] == ["label", "y"]  # the client's order
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(response[split:], dtype="<i4").tolist() == [7, 8]
    assert header["outputs"][1]["data"] == _x().ravel().tolist()


def test_missing_engine_output_is_an_internal_error():
    parsed = _parse(_with(lambda r: r.update(outputs=[{"name": "label"}])))
    with pytest.raises(EbbInternalError, match="label"):
        encode_infer_response("demo", {"y": _x()}, parsed)


# --- tritonclient compatibility -------------------------------------------------------------------

@pytest.mark.parametrize("binary_inputs", [True, False])
@pytest.mark.parametrize("outputs", ["all (binary_data_output)", "binary", "json", "mixed"])
def test_tritonclient_requests_and_responses(binary_inputs, outputs):
    httpclient = pytest.importorskip("tritonclient.http")
    x_in = httpclient.InferInput("x", [2, 4], "FP32").set_data_from_numpy(_x(), binary_data=binary_inputs)
    ids_in = httpclient.InferInput("ids", [2, 2], "INT64").set_data_from_numpy(_ids(), binary_data=binary_inputs)
    requested = {
        "all (binary_data_output)": None,
        "binary": [httpclient.InferRequestedOutput("y"), httpclient.InferRequestedOutput("label")],
        "json": [httpclient.InferRequestedOutput("y", binary_data=False),
                 httpclient.InferRequestedOutput("label", binary_data=False)],
        "mixed": [httpclient.InferRequestedOutput("label", binary_data=False), httpclient.InferRequestedOutput("y")],
    }[outputs]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [x_in, ids_in], outputs=requested, request_id="t-1")
    # tritonclient sends no Content-Type, and the header length only with binary inputs.
    parsed = _parse(body, content_type=None, header_length=None if json_size is None else str(json_size))
    np.testing.assert_array_equal(parsed.inputs["x"], _x())
    np.testing.assert_array_equal(parsed.inputs["ids"], _ids())

    y, label = _x() + 1, np.array([5, -6], dtype=np.int32)
    response, headers = encode_infer_response("demo", {"y": y, "label": label}, parsed)
    header_length = headers.get(HEADER_LENGTH_HEADER)
    result = httpclient.InferResult.from_response_body(
        response, header_length=None if header_length is None else int(header_length))
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert result.get_response()["id"] == "t-1"


def test_tritonclient_bf16_and_bool():
    httpclient = pytest.importorskip("tritonclient.http")
    desc = EngineDescription(
        name="mixed", inputs=(TensorSpec("b", "bfloat16", (-1, 2)), TensorSpec("m", "bool", (-1, 2))),
        outputs=(TensorSpec("o", "bfloat16", (-1, 2)),),
        profiles={"b": ShapeProfile((1, 2), (1, 2), (4, 2)), "m": ShapeProfile((1, 2), (1, 2), (4, 2))},
        weights_bytes=0, backend="pytorch")
    b = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=ml_dtypes.bfloat16)
    m = np.array([[True, False], [False, True]])
    inputs = [httpclient.InferInput("b", [2, 2], "BF16").set_data_from_numpy(b),
              httpclient.InferInput("m", [2, 2], "BOOL").set_data_from_numpy(m)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs)
    parsed = _parse(body, content_type=None, header_length=str(json_size), desc=desc)
    assert str(parsed.inputs["b"].dtype) == "bfloat16"
    np.testing.assert_array_equal(parsed.inputs["b"], b)
    np.testing.assert_array_equal(parsed.inputs["m"], m)

    response, headers = encode_infer_response("mixed", {"o": b * 2}, parsed)
    result = httpclient.InferResult.from_response_body(response, header_length=int(headers[HEADER_LENGTH_HEADER]))
    np.testing.assert_array_equal(result.as_numpy("o"), b * 2)


# --- generated cases -------------------------------------------------------------------------------

DESCS = [_single_input_desc(dtype, rank) for dtype in SUPPORTED_DTYPES for rank in (1, 2, 3)]
JSON_SAFE = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


def _allowed(exc: BaseException) -> bool:
    return isinstance(exc, (ProtocolError, InvalidInputError))


@st.composite
def _valid_requests(draw) -> tuple[EngineDescription, np.ndarray, dict[str, Any], bool]:
    desc = draw(st.sampled_from(DESCS))
    spec = desc.inputs[0]
    shape = tuple(draw(st.integers(1, 4)) for _ in spec.shape)
    dtype = np.dtype(ml_dtypes.bfloat16) if spec.dtype == "bfloat16" else np.dtype(spec.dtype)
    if spec.dtype == "bool":
        array = np.array(draw(st.lists(st.booleans(), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))))
    else:
        array = np.arange(int(np.prod(shape))).astype(dtype)
    array = array.reshape(shape)
    binary = spec.dtype not in JSON_SAFE or draw(st.booleans())
    request = {"inputs": [_json_input("t", array, datatype_for(spec.dtype))]}
    if not binary and draw(st.booleans()):
        request["inputs"][0]["data"] = array.tolist()  # nested
    return desc, array, request, binary


def _mutations():
    any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=3),
                            max_leaves=12)
    huge = st.integers(-(2**70), 2**70)
    return st.one_of(
        st.just(("none", None)),
        st.tuples(st.just("shape"), st.lists(huge | st.integers(0, 6), max_size=5)),
        st.tuples(st.just("datatype"), st.sampled_from([*DATATYPES, "BYTES", "fp32", ""])),
        st.tuples(st.just("data"), any_json),
        st.tuples(st.just("binary_data_size"), huge | any_json),
        st.tuples(st.just("header_delta"), st.integers(-50, 50)),
        st.tuples(st.just("header_text"), st.text(max_size=12)),
        st.tuples(st.just("truncate"), st.integers(1, 40)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("flip"), st.tuples(st.integers(0, 10_000), st.integers(1, 255))),
        st.tuples(st.just("extra_input"), any_json),
    )


def _apply(request: dict[str, Any], array: np.ndarray, binary: bool, mutation: tuple[str, Any]
           ) -> tuple[bytes, str | None]:
    kind, value = mutation
    tensor = request["inputs"][0]
    if kind in ("shape", "datatype", "data"):
        tensor[kind] = value
    elif kind == "extra_input":
        request["inputs"].append(value)
    if binary:
        if kind != "data":
            del tensor["data"]
        tensor.setdefault("parameters", {})["binary_data_size"] = array.nbytes
    if kind == "binary_data_size":
        tensor.setdefault("parameters", {})["binary_data_size"] = value
    header = json.dumps(request).encode()
    body = header + (array.tobytes() if binary else b"")
    header_length: str | None = str(len(header)) if binary else None
    if kind == "header_delta":
        header_length = str(len(header) + value)
    elif kind == "header_text":
        header_length = value
    elif kind == "truncate":
        body = body[:-value]
    elif kind == "append":
        body = body + value
    elif kind == "flip" and body:
        index = value[0] % len(body)
        body = body[:index] + bytes([body[index] ^ value[1]]) + body[index + 1:]
    return body, header_length


def _check_bounded(parsed: InferRequest, body: bytes) -> None:
    # JSON needs at least 2 bytes an element and an element is at most 8 bytes.
    assert sum(a.nbytes for a in parsed.inputs.values()) <= 4 * len(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_valid_requests(), mutation=_mutations())
def test_generated_requests_only_ever_raise_client_errors(case, mutation):
    desc, array, request, binary = case
    body, header_length = _apply(request, array, binary, mutation)
    try:
        parsed = _parse(body, content_type=None, header_length=header_length, desc=desc)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        assert _allowed(exc), f"{type(exc).__name__}: {exc}"
        return
    _check_bounded(parsed, body)
    if mutation[0] == "none":
        np.testing.assert_array_equal(parsed.inputs["t"], array)
        assert parsed.inputs["t"].dtype == array.dtype


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), header_length=st.none() | st.text(max_size=8) | st.integers(-5, 400).map(str),
       content_type=st.none() | st.sampled_from(["application/json", "text/html", "application/octet-stream; x=y"]))
def test_garbage_bodies_only_ever_raise_client_errors(body, header_length, content_type):
    try:
        _parse(body, content_type=content_type, header_length=header_length)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        assert _allowed(exc), f"{type(exc).__name__}: {exc}"


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.integers(0, 2**64), min_size=2, max_size=2), binary=st.booleans(),
       size=st.integers(0, 2**64))
def test_lying_shapes_never_allocate_more_than_the_body(dims, binary, size):
    tensor: dict[str, Any] = {"name": "x", "shape": dims, "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": size}
    else:
        tensor["data"] = [0.5] * 8
    header = json.dumps({"inputs": [tensor, _json_input("ids", _ids())]}).encode()
    body = header + b"\0" * 64 if binary else header
    tracemalloc.start()
    try:
        _parse(body, content_type=None, header_length=str(len(header)) if binary else None)
    except (ProtocolError, InvalidInputError):
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Parsing the JSON itself costs a few KiB; a shape believed would cost up to exabytes.
    assert peak < 64 * len(body) + (256 << 10), peak


def _perf_analyzer_version(start: dict, end: dict, name: str) -> int:
    """What perf_analyzer does with two statistics readings around a measurement when no
    version was asked for (inference_profiler.cc, 2.60): the highest version of ``name``
    whose queue count grew, -1 if none; and it refuses unequal compute counts."""
    def by_id(body: dict) -> dict:
        return {(m["name"], m["version"]): m["inference_stats"] for m in body["model_stats"]}

    found = -1
    before = by_id(start)
    for (n, version), stats in by_id(end).items():
        counts = {stats[k]["count"] for k in ("compute_input", "compute_infer", "compute_output")}
        if len(counts) != 1:
            raise RuntimeError("Server side statistics compute counts must be the same.")
        grew = stats["queue"]["count"] > before.get((n, version), {"queue": {"count": 0}})["queue"]["count"]
        if n == name and grew:
            found = max(found, int(version))
    return found


def test_statistics_let_perf_analyzer_find_the_model_version():
    """Before: queue and compute_input/output counts were 0 while compute_infer counted
    the successes, so perf_analyzer on an H200 failed every measurement with "failed to
    find the requested model version"."""
    from deployments.protocol.response import model_statistics

    def reading(successes: int) -> dict:
        return {"model_stats": [model_statistics("r50", "1", success_count=successes, success_ns=successes * 1000,
                                                 fail_count=0, inference_count=successes, last_inference_ms=1)]}

    assert _perf_analyzer_version(reading(10), reading(25), "r50") == 1
    # Nothing ran in the window: no version found, as Triton itself would answer.
    assert _perf_analyzer_version(reading(10), reading(10), "r50") == -1
    stats = reading(7)["model_stats"][0]["inference_stats"]
    assert stats["queue"]["count"] == stats["compute_input"]["count"] == stats["compute_output"]["count"] == 7
    assert stats["compute_infer"] == {"count": 7, "ns": 7000}  # the whole call's time, where it was measured
