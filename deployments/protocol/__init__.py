"""The Open Inference Protocol (KServe v2) as plain functions over bytes, dicts and arrays.

One module per concept: ``request`` (parsing and checking infer requests, JSON and
binary), ``response`` (metadata and infer answers), ``status`` (what a failure is
answered with, HTTP and gRPC), ``triton_config`` (Triton's model-configuration
extension) and ``datatypes`` (KServe's datatypes against numpy's). Nothing here
imports Ray or a web framework.
"""

from deployments.protocol.datatypes import DATATYPES, datatype_for
from deployments.protocol.request import (
    HEADER_LENGTH_HEADER,
    CheckedInputs,
    InferRequest,
    RequestedOutput,
    check_content_length,
    parse_infer_object,
    parse_infer_request,
    validation_key,
)
from deployments.protocol.repository import model_control_refused, parse_index_request, repository_index
from deployments.protocol.response import (
    encode_infer_response,
    model_metadata,
    model_statistics,
)
from deployments.protocol.status import (
    ClientDisconnected,
    ModelNotFound,
    ProtocolError,
    error_body,
    grpc_code_for,
    http_status_for,
)
from deployments.protocol.triton_config import model_config

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH_HEADER",
    "CheckedInputs",
    "ClientDisconnected",
    "InferRequest",
    "ModelNotFound",
    "ProtocolError",
    "RequestedOutput",
    "check_content_length",
    "datatype_for",
    "encode_infer_response",
    "error_body",
    "grpc_code_for",
    "http_status_for",
    "model_config",
    "model_control_refused",
    "model_metadata",
    "model_statistics",
    "parse_index_request",
    "parse_infer_object",
    "parse_infer_request",
    "repository_index",
    "validation_key",
]
