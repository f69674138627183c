"""KServe v2 gRPC requests into the protocol's request object (deployments.grpc_service):
raw tensors copied out once and sized without serializing the message, typed contents
beside raw ones refused as Triton refuses them."""

from __future__ import annotations

import numpy as np
import pytest

from deployments import grpc_service as g
from deployments.protocol import ProtocolError
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec

DESC = EngineDescription(
    name="img", inputs=(TensorSpec("input", "float32", (-1, 3, 8, 8)),), outputs=(TensorSpec("o", "float32", (-1, 10)),),
    profiles={"input": ShapeProfile((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}, weights_bytes=0, backend="pytorch")


def _raw_request(x: np.ndarray):
    req = g.pb.ModelInferRequest(model_name="img")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return g.pb.ModelInferRequest.FromString(req.SerializeToString())


def test_raw_tensors_are_sized_by_their_bytes_and_parsed_from_one_copy():
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    req = _raw_request(x)
    raw = g.raw_contents(req)
    assert g.request_bytes(req, raw) == x.nbytes
    parsed = g.parse_model_infer(req, DESC, raw)
    np.testing.assert_array_equal(parsed.inputs["input"], x)
    np.testing.assert_array_equal(g.parse_model_infer(req, DESC).inputs["input"], x)  # without raw given


def test_typed_contents_keep_the_message_size_as_their_bound():
    req = g.pb.ModelInferRequest(model_name="img")
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
    t.contents.fp32_contents.extend([0.5] * 192)
    assert g.raw_contents(req) is None
    assert g.request_bytes(req, None) == req.ByteSize()
    obj, raw, bound = g.infer_request_object(req)
    assert raw is None and bound == 2 * req.ByteSize() + 2 and len(obj["inputs"][0]["data"]) == 192


def test_typed_contents_beside_raw_ones_are_a_400_naming_the_input():
    x = np.zeros((1, 3, 8, 8), np.float32)
    req = g.pb.ModelInferRequest(model_name="img")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend([0.0] * 192)
    req.raw_input_contents.append(x.tobytes())
    with pytest.raises(ProtocolError) as err:
        g.infer_request_object(req)
    assert err.value.status_code == 400 and "'input'" in err.value.message and "raw_input_contents" in err.value.message
