"""KServe v2 gRPC (``inference.GRPCInferenceService``) through Ray Serve's own gRPC proxy.

``cluster.yaml`` names :func:`add_GRPCInferenceServiceServicer_to_server` under
``grpc_options.grpc_servicer_functions``; Serve's proxy then accepts Triton's service
and calls the ingress deployment's method of the same name (``ModelInfer``,
``ModelMetadata``, ...), which converts with the functions here and shares every
check and status with HTTP. ``tritonclient.grpc`` and ``perf_analyzer -i grpc`` work
unmodified.

Why a shim and not tritonclient's own ``add_GRPCInferenceServiceServicer_to_server``:
tritonclient's generated messages say they live in a module named
``grpc_service_pb2`` (``tritonclient/grpc/service_pb2.py`` builds them with
``BuildTopDescriptorsAndMessages(DESCRIPTOR, 'grpc_service_pb2', ...)``), which no
installed package provides. Serve's proxy pickles each request message on its way
to the replica (``ray/serve/_private/proxy_request_response.py``,
``gRPCProxyRequest.serialized_replica_arg``) and the replica unpickles it
(``replica.py``, ``_preprocess_request_args``); both fail with "import of module
'grpc_service_pb2' failed" / "No module named 'grpc_service_pb2'". Importing this
module registers tritonclient's module under that name in the proxy (which imports
the servicer function) and in the ingress replica (``deployments.ingress`` imports
this module), so pickling finds the classes. docs/serving.md has the evidence.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from deployments.protocol.request import parse_infer_object
from deployments.protocol.response import checked_outputs, little_endian_bytes
from deployments.protocol.status import ProtocolError

__all__ = [
    "add_GRPCInferenceServiceServicer_to_server",
    "infer_request_object",
    "raw_contents",
    "request_bytes",
    "infer_response",
    "model_config_response",
    "model_metadata_response",
    "pb",
]

# The module names tritonclient's messages claim (see the module docstring).
sys.modules.setdefault("grpc_service_pb2", service_pb2)
sys.modules.setdefault("model_config_pb2", model_config_pb2)

#: The generated messages, for the ingress's methods.
pb = service_pb2

#: KServe datatype -> the typed ``contents`` field that carries it (gRPC's non-raw form).
_CONTENTS_FIELD: Mapping[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:
    """What ``grpc_options.grpc_servicer_functions`` names: tritonclient's own registration."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def raw_contents(request: Any) -> list[bytes] | None:
    """``raw_input_contents`` copied out once (upb makes a new bytes object at each access),
    or None where the request has none."""
    return list(request.raw_input_contents) if len(request.raw_input_contents) else None


def request_bytes(request: Any, raw: list[bytes] | None) -> int:
    """The request's size for the body limit. With raw tensors, their bytes: upb's
    ``ByteSize`` serializes the whole message to count it (28 µs for one ResNet image on
    the CPU machine), and typed contents beside raw ones are refused anyway
    (:func:`infer_request_object`); with typed contents, the message's size."""
    return sum(map(len, raw)) if raw is not None else request.ByteSize()


def infer_request_object(request: Any, raw: list[bytes] | None = None) -> tuple[dict[str, Any], list[bytes] | None,
                                                                             int]:
    """A ``ModelInferRequest`` as the JSON protocol's request object, for ``parse_infer_object``.

    Returns ``(request object, raw buffers or None, bound on JSON elements)``: with
    ``raw_input_contents`` (``raw``, from :func:`raw_contents`, when the caller has it)
    every input is a buffer (``binary_data_size`` set to its length, so a wrong length is
    refused by the same check as HTTP's); otherwise the typed ``contents`` become flat
    ``data``.
    """
    if raw is None:
        raw = raw_contents(request)
    inputs = []
    for tensor in request.inputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                                 "parameters": {k: _parameter(v) for k, v in tensor.parameters.items()}}
        if raw is None:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise ProtocolError(400, f"input {tensor.name!r}: datatype {tensor.datatype!r} must be sent in "
                                         f"raw_input_contents")
            entry["data"] = list(getattr(tensor.contents, field))
        elif tensor.HasField("contents"):
            raise ProtocolError(400, f"input {tensor.name!r} has typed contents and the request has "
                                     f"raw_input_contents; send every input one way (Triton's rule)")
        inputs.append(entry)
    if raw is not None:
        if len(raw) != len(inputs):
            raise ProtocolError(400, f"raw_input_contents has {len(raw)} buffers for {len(inputs)} inputs; send "
                                     f"one per input, in the order of 'inputs'")
        for entry, buffer in zip(inputs, raw, strict=True):
            entry["parameters"]["binary_data_size"] = len(buffer)
    obj: dict[str, Any] = {"inputs": inputs}
    if request.id:
        obj["id"] = request.id
    params = {k: _parameter(v) for k, v in request.parameters.items()}
    if params:
        obj["parameters"] = params
    if len(request.outputs):
        obj["outputs"] = [{"name": o.name, **({"parameters": {k: _parameter(v) for k, v in o.parameters.items()}}
                                              if len(o.parameters) else {})} for o in request.outputs]
    # Typed contents take at least one byte an element on the wire: twice the message's
    # size bounds the elements as the JSON check's (bytes + 1) // 2 does. Raw tensors
    # carry no JSON elements, so nothing to bound (and no ByteSize to pay).
    return obj, raw, (2 * request.ByteSize() + 2 if raw is None else 0)


def parse_model_infer(request: Any, desc: Any, raw: list[bytes] | None = None) -> Any:
    """A ``ModelInferRequest`` parsed and checked against ``desc`` (``protocol.InferRequest``),
    as the HTTP side parses a body. NaN and infinity are the model's rule, applied by its
    replica. ``raw``: its :func:`raw_contents`, where the caller has them already."""
    obj, raw, json_bytes = infer_request_object(request, raw)
    return parse_infer_object(obj, desc, json_bytes=json_bytes, raw_inputs=raw, reject_non_finite=False)


def infer_response(model_name: str, model_version: str, request_id: str | None,
                   outputs: Mapping[str, np.ndarray], names: Sequence[str]) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents`` (what tritonclient reads)."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for name, array, datatype in checked_outputs(outputs, names):
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(little_endian_bytes(array))
    return response


def model_metadata_response(metadata: Mapping[str, Any]) -> Any:
    """``ModelMetadataResponse`` from the HTTP metadata body (``protocol.model_metadata``)."""
    return json_format.ParseDict(dict(metadata), pb.ModelMetadataResponse())


def model_config_response(config: Mapping[str, Any]) -> Any:
    """``ModelConfigResponse`` from Triton's JSON configuration (``protocol.model_config``)."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(dict(config), model_config_pb2.ModelConfig()))
