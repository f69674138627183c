"""The infer routes' request and response bodies in OpenAPI, for the app's ``/openapi.json``.

The ingress reads the raw body itself (JSON, or a JSON header plus binary tensors),
so FastAPI sees no body parameter; without these schemas, schema-driven clients and
fuzzers (schemathesis) would never send a body. Plain data, KServe v2's REST schema.
"""

from __future__ import annotations

from typing import Any

from deployments.protocol.datatypes import DATATYPES
from deployments.protocol.request import HEADER_LENGTH_HEADER

__all__ = ["INFER_OPERATION", "METADATA_RESPONSES"]

_PARAMETERS = {"type": "object", "additionalProperties": True,
               "description": "binary_data_size (binary extension), binary_data / binary_data_output"}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_DATA = {"type": "array", "description": "Flat row-major, or nested exactly as the shape",
         "items": {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "array"}]}}

_INFER_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "shape": _SHAPE,
                           "datatype": {"type": "string", "enum": sorted(DATATYPES)},
                           "parameters": _PARAMETERS, "data": _DATA}}},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS}}},
    },
}
_INFER_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": _SHAPE, "datatype": {"type": "string"},
                           "parameters": _PARAMETERS, "data": _DATA}}},
    },
}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_BINARY = {"type": "string", "format": "binary",
           "description": f"A JSON header of {HEADER_LENGTH_HEADER} bytes, then the binary tensors"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


_ERRORS = {
    "400": _error("A malformed request or tensors the model refuses; the message names the culprit"),
    "404": _error("Unknown model or version"),
    "408": _error("The body was not received in time"),
    "413": _error("The body is over http.max_body_bytes"),
    "415": _error("Neither JSON nor the binary extension"),
    "503": _error("No context memory in time, a replica going away, or too many bodies being received; "
                  "see Retry-After"),
}

#: ``openapi_extra`` of the infer routes.
INFER_OPERATION: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _INFER_REQUEST},
                    "application/octet-stream": {"schema": _BINARY}},
    },
    "responses": {
        "200": {"description": "The outputs", "content": {"application/json": {"schema": _INFER_RESPONSE},
                                                          "application/octet-stream": {"schema": _BINARY}}},
        **_ERRORS,
    },
}

#: ``responses`` of the metadata and config routes.
METADATA_RESPONSES: dict[int | str, dict[str, Any]] = {404: _ERRORS["404"], 503: _ERRORS["503"]}
