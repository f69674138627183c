"""The protocol's hardening (issue 12) and Triton's model configuration (issue 14).

Each case here was accepted, or answered badly, before its fix: mis-nested JSON data
with the right count, a thousand-dimension shape's 3 KB message, a 5,000-digit
integer answered with Python's int_max_str_digits hint, NaN refused for a model that
allows it, binary tensors copied out of the body.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.protocol import (
    HEADER_LENGTH_HEADER,
    ProtocolError,
    grpc_code_for,
    http_status_for,
    model_config,
    parse_infer_request,
)
from engine_runtime.errors import InputShapeError
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec

IMAGE = EngineDescription(
    name="r50",
    inputs=(TensorSpec("input", "float32", (-1, 3, 224, 224)),),
    outputs=(TensorSpec("output", "float32", (-1, 1000)),),
    profiles={"input": ShapeProfile((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))},
    weights_bytes=0,
    backend="pytorch",
)
TOKENS = EngineDescription(
    name="enc",
    inputs=(TensorSpec("input_ids", "int64", (-1, 16), value_range=(0, 99)),),
    outputs=(TensorSpec("hidden", "float32", (-1, 16, 8)),),
    profiles={"input_ids": ShapeProfile((1, 16), (2, 16), (4, 16))},
    weights_bytes=0,
    backend="tensorrt",
)
LIMIT = 64 << 20


def _json_body(data, shape=(1, 3, 224, 224), name="input", datatype="FP32") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}).encode()


def _parse(body: bytes, desc: EngineDescription = IMAGE, **kwargs):
    return parse_infer_request(body, content_type="application/json", header_length=kwargs.pop("header_length", None),
                               desc=desc, max_body_bytes=LIMIT, **kwargs)


def _status(call) -> tuple[int, str]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - mapped as the ingress maps it
        status, message, _ = http_status_for(exc)
        return status, message
    return 200, ""


# -- JSON data must follow the declared shape -----------------------------------------------

N = 3 * 224 * 224


@pytest.mark.parametrize("case", ["ragged", "transposed", "half-nested"])
def test_mis_nested_data_with_the_right_count_is_refused(case):
    if case == "ragged":
        data = [[0.0] * (N - 1), [0.0]]
    elif case == "transposed":  # nested as (1, 224, 3, 224): right count, wrong tensor
        data = np.zeros((1, 224, 3, 224), np.float32).tolist()
    else:  # [[flat]]: neither flat nor nested as the shape
        data = [[0.0] * N]
    status, message = _status(lambda: _parse(_json_body(data)))
    assert status == 400, message
    assert "nested" in message and "[1, 3, 224, 224]" in message and len(message) < 300


def test_flat_and_exactly_nested_data_are_both_accepted():
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    flat = _parse(_json_body(x.ravel().tolist())).inputs["input"]
    nested = _parse(_json_body(x.tolist())).inputs["input"]
    np.testing.assert_array_equal(flat, x)
    np.testing.assert_array_equal(nested, x)


# -- messages stay short whatever the client sent ------------------------------------------

def test_a_thousand_dimension_shape_gets_a_short_message():
    status, message = _status(lambda: _parse(_json_body([0.0], shape=[1] * 1000)))
    assert status == 400 and "rank 1000" in message
    assert len(message) < 300, len(message)
    assert len(str(InputShapeError("x", "[1..4, 16]", (1,) * 1000))) < 200


@pytest.mark.parametrize("where", ["data", "shape"])
def test_a_five_thousand_digit_integer_gets_a_clear_400(where):
    huge = "9" * 5000
    if where == "data":
        body = ('{"inputs":[{"name":"input_ids","shape":[1,16],"datatype":"INT64","data":[' + huge
                + ",0" * 15 + "]}]}").encode()
    else:
        body = ('{"inputs":[{"name":"input_ids","shape":[' + huge + ',16],"datatype":"INT64","data":[0]}]}').encode()
    status, message = _status(lambda: _parse(body, TOKENS))
    assert status == 400, message
    assert "5000 digits" in message or "over 309 digits" in message, message
    assert "int_max_str_digits" not in message and "input_ids" in message and len(message) < 300


# -- NaN and infinity: the model's rule, not the protocol's --------------------------------

def test_nan_passes_the_protocol_when_the_model_allows_it():
    body = _json_body([float("nan")] + [0.0] * (N - 1))  # json.dumps writes the NaN literal
    assert _status(lambda: _parse(body))[0] == 400  # the default: refused, naming the input
    parsed = _parse(body, reject_non_finite=False)
    assert np.isnan(parsed.inputs["input"][0, 0, 0, 0]) and not parsed.finite_checked


# -- binary tensors are views of the body -------------------------------------------------

def _binary_body(x: np.ndarray) -> tuple[bytearray, str]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    # Padded to 4 bytes so the tensor after it is aligned, as tritonclient's headers often are not.
    header += b" " * (-len(header) % 4)
    return bytearray(header + x.tobytes()), str(len(header))


def test_binary_input_in_a_bytearray_body_is_not_copied():
    x = np.random.default_rng(1).random((2, 3, 224, 224), dtype=np.float32)
    body, header_length = _binary_body(x)
    parsed = parse_infer_request(body, content_type=None, header_length=header_length, desc=IMAGE,
                                 max_body_bytes=LIMIT)
    got = parsed.inputs["input"]
    np.testing.assert_array_equal(got, x)
    assert np.shares_memory(got, np.frombuffer(body, np.uint8)), "the tensor was copied out of the body"
    # Read-only bytes (what a test client or a cached body may hand over): copied, writable.
    copied = parse_infer_request(bytes(body), content_type=None, header_length=header_length, desc=IMAGE,
                                 max_body_bytes=LIMIT).inputs["input"]
    assert copied.flags.writeable and copied.flags.aligned


def test_binary_header_length_with_many_digits_is_refused_cheaply():
    with pytest.raises(ProtocolError) as err:
        _parse(b"{}", header_length="9" * 5000)
    assert err.value.status_code == 400 and len(err.value.message) < 200 and HEADER_LENGTH_HEADER in err.value.message


# -- Triton's model configuration ----------------------------------------------------------

def test_model_config_is_tritons_form():
    config = model_config(IMAGE, max_batch_size=8, max_queue_delay_s=0.005)
    assert config["name"] == "r50" and config["max_batch_size"] == 32
    assert (config["platform"], config["backend"]) == ("pytorch_libtorch", "pytorch")
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, 224, 224]}]
    assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [1000]}]
    assert config["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 5000}
    # No batching configured (or batches of one): Triton's configs then omit dynamic_batching.
    assert "dynamic_batching" not in model_config(TOKENS, max_batch_size=1)
    tokens = model_config(TOKENS)
    assert tokens["input"] == [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [16]}]
    assert tokens["platform"] == "tensorrt_plan"


def test_model_config_parses_as_tritons_protobuf():
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    proto = json_format.ParseDict(model_config(IMAGE, max_batch_size=8, max_queue_delay_s=0.002),
                                  model_config_pb2.ModelConfig())
    assert proto.max_batch_size == 32 and list(proto.input[0].dims) == [3, 224, 224]
    assert proto.input[0].data_type == model_config_pb2.TYPE_FP32
    assert proto.dynamic_batching.max_queue_delay_microseconds == 2000


def test_dynamic_dims_are_minus_one():
    desc = EngineDescription(
        name="seq", inputs=(TensorSpec("t", "int32", (-1, -1)),), outputs=(TensorSpec("o", "float32", (-1, -1)),),
        profiles={"t": ShapeProfile((1, 1), (2, 64), (4, 128))}, weights_bytes=0, backend="pytorch")
    assert model_config(desc)["input"][0]["dims"] == [-1]


@pytest.mark.parametrize(("status", "code"), [(400, "INVALID_ARGUMENT"), (404, "NOT_FOUND"),
                                              (408, "DEADLINE_EXCEEDED"), (413, "RESOURCE_EXHAUSTED"),
                                              (415, "INVALID_ARGUMENT"), (503, "UNAVAILABLE"), (500, "INTERNAL")])
def test_grpc_codes_mirror_http_statuses(status, code):
    assert grpc_code_for(status) == code


def test_non_finite_outputs_are_written_as_json_numbers_not_null():
    from deployments.protocol import InferRequest, encode_infer_response

    request = InferRequest(id=None, inputs={}, outputs=(), binary_data_output=False)
    out = np.array([[1.0, np.nan, np.inf]], np.float32)
    body, _ = encode_infer_response("m", {"output": out}, request)
    data = json.loads(body)["outputs"][0]["data"]
    assert data[0] == 1.0 and np.isnan(data[1]) and data[2] == float("inf")
