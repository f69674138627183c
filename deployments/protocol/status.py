"""What a failed request is answered with: HTTP status and headers, or gRPC code.

One mapping for both transports: client mistakes are 4xx (gRPC INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED for a body too large), a lack of GPU memory in time
or a replica going away (or broken, waiting to be replaced) is 503 with
``Retry-After`` (UNAVAILABLE), a body not sent in time is 408 (DEADLINE_EXCEEDED),
and anything else is a bug: 500 (INTERNAL), logged with its traceback, its details
kept from the client.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence

from engine_runtime.errors import (
    ContextMemoryUnavailable,
    EbbError,
    EngineBrokenError,
    EngineClosedError,
    InvalidInputError,
)

__all__ = ["ClientDisconnected", "ModelNotFound", "ProtocolError", "error_body", "grpc_code_for", "http_status_for"]

logger = logging.getLogger(__name__)

#: Bounds on Retry-After: at least a second (RFC 9110 counts whole seconds), and not
#: so long that a client gives up on a replica that frees memory in a moment.
_MIN_RETRY_AFTER_S = 1
_MAX_RETRY_AFTER_S = 30

#: HTTP status -> gRPC status code name (``grpc.StatusCode[name]``); the KServe v2
#: gRPC protocol answers the same failures as its REST twin, with these codes.
_GRPC_CODES: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    503: "UNAVAILABLE",
}


class ProtocolError(EbbError):
    """A request the protocol layer refuses, with the HTTP status (and headers) to answer it with."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str] | None = None):
        self.status_code = int(status_code)
        self.message = message
        self.headers = dict(headers or {})
        super().__init__(message)


class ModelNotFound(ProtocolError):
    """The URL names a model (or version) this application does not serve."""

    def __init__(self, name: str, served: Sequence[str], version: str | None = None):
        self.name = name
        self.version = version
        self.served = sorted(served)
        what = f"model {name!r} version {version!r}" if version is not None else f"model {name!r}"
        super().__init__(404, f"unknown {_bounded(what)}; served models are {self.served}")


class ClientDisconnected(ProtocolError):
    """The client closed its connection before its body arrived: nobody reads the answer.

    A client's choice, not a bug: logged at INFO, never as an internal error.
    """

    def __init__(self, received_bytes: int):
        self.received_bytes = int(received_bytes)
        super().__init__(400, f"client disconnected after sending {self.received_bytes} bytes of its body")


def _bounded(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def http_status_for(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """The HTTP status, message and extra headers answering a request that raised ``exc``."""
    if isinstance(exc, ProtocolError):
        return exc.status_code, exc.message, dict(exc.headers)
    if isinstance(exc, InvalidInputError):
        return 400, str(exc), {}
    if isinstance(exc, ContextMemoryUnavailable):
        retry_after_s = min(_MAX_RETRY_AFTER_S, max(_MIN_RETRY_AFTER_S, math.ceil(exc.waited_s)))
        return 503, str(exc), {"Retry-After": str(retry_after_s)}
    if isinstance(exc, (EngineClosedError, EngineBrokenError)):
        # Graceful shutdown closes the engine under requests still queued; a sticky CUDA
        # error left the replica's context unusable (its health check fails and Serve
        # replaces it). Either way Serve routes the retry to another replica.
        return 503, str(exc), {"Retry-After": str(_MIN_RETRY_AFTER_S)}
    logger.error("internal error answering a request: %s", type(exc).__name__, exc_info=exc)
    return 500, "internal error", {}


def grpc_code_for(status_code: int) -> str:
    """The gRPC status code name answering what HTTP answers with ``status_code``."""
    return _GRPC_CODES.get(int(status_code), "INTERNAL" if status_code >= 500 else "INVALID_ARGUMENT")


def error_body(message: str) -> bytes:
    """The protocol's error body, ``{"error": message}``."""
    return json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")
