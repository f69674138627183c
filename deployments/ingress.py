"""The HTTP ingress: the Open Inference Protocol (KServe v2) over Ray Serve.

Routes requests to the model deployments through their handles; a grouped model's
handle is its group's, with the model name as Serve's multiplexed model id. Parsing and
encoding are in ``deployments.protocol`` (pure); this module only moves bytes and
maps exceptions to statuses: client mistakes 4xx, no GPU memory in time 503 with
``Retry-After``, a replica that died mid-call 503, and anything else 500 (a bug).
"""

# No ``from __future__ import annotations`` here: FastAPI reads route signatures at
# run time, and under Serve's ingress wrapper string annotations such as "Request"
# do not resolve, turning the request into a required query parameter (HTTP 422).
import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from deployments import protocol
from deployments.config import HttpConfig
from engine_runtime.spec import EngineDescription

logger = logging.getLogger(__name__)

SERVER_NAME = "ebb"
SERVER_VERSION = "0.1.0"
#: Every model is served as version "1"; the URL may name it or leave it out.
MODEL_VERSION = "1"

api = FastAPI(title="Ebb", description="Open Inference Protocol (KServe v2) for Ebb's models")


@api.exception_handler(HTTPException)
async def _framework_error(request: Request, exc: HTTPException) -> Response:
    """Unknown routes and methods (404, 405) in the protocol's error body, ``{"error": ...}``,
    instead of FastAPI's ``{"detail": ...}``: a client gets one error shape from Ebb."""
    return Response(protocol.error_body(f"{exc.detail}: {request.method} {request.url.path}"),
                    status_code=exc.status_code, headers=getattr(exc, "headers", None),
                    media_type="application/json")


def _unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrapper when there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _is_replica_gone(exc: BaseException) -> bool:
    import ray.exceptions as rex

    gone = tuple(t for t in (getattr(rex, "RayActorError", None), getattr(rex, "ActorUnavailableError", None),
                             getattr(rex, "ActorDiedError", None)) if t is not None)
    backpressure = getattr(serve.exceptions, "BackPressureError", None)
    return isinstance(exc, gone) or (backpressure is not None and isinstance(exc, backpressure))


def _error(exc: BaseException, retry_after_s: int) -> Response:
    exc = _unwrap(exc)
    if _is_replica_gone(exc):
        status, message, headers = 503, f"model replica unavailable: {type(exc).__name__}", {
            "Retry-After": str(retry_after_s)}
    else:
        status, message, headers = protocol.http_status_for(exc)
    return Response(protocol.error_body(message), status_code=status, headers=headers,
                    media_type="application/json")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class EbbIngress:
    def __init__(self, handles: dict[str, Any], http: dict, coordinator_namespace: str = "ebb",
                 model_groups: dict[str, str] | None = None) -> None:
        groups = model_groups or {}
        group_names = set(groups.values())
        #: Model name -> the handle that serves it (a group's, routed by the model id).
        self.handles = {name: h for name, h in handles.items() if name not in group_names}
        self.handles.update({model: handles[group].options(multiplexed_model_id=model)
                             for model, group in groups.items()})
        self.http = HttpConfig.model_validate(http)
        self.coordinator_namespace = coordinator_namespace
        self._descs: dict[str, EngineDescription] = {}

    async def _desc(self, name: str, version: str | None) -> EngineDescription:
        if name not in self.handles or (version is not None and version != MODEL_VERSION):
            raise protocol.ModelNotFound(name, list(self.handles), version)
        if name not in self._descs:
            self._descs[name] = await self.handles[name].describe.remote()
        return self._descs[name]

    # -- health and metadata ------------------------------------------------------

    @api.get("/v2")
    async def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live")
    async def live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        results = await asyncio.gather(*(self._model_ready(n) for n in self.handles))
        return Response(status_code=200 if all(results) else 503)

    async def _model_ready(self, name: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handles[name].ready.remote(), timeout=5.0))
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
            return False

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(self, name: str, version: str | None = None) -> Response:
        try:
            desc = await self._desc(name, version)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            return _error(exc, self.http.retry_after_s)
        return JSONResponse(protocol.model_metadata(desc, versions=[MODEL_VERSION]))

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(self, name: str, version: str | None = None) -> Response:
        if name not in self.handles or (version is not None and version != MODEL_VERSION):
            return _error(protocol.ModelNotFound(name, list(self.handles), version), self.http.retry_after_s)
        return Response(status_code=200 if await self._model_ready(name) else 503)

    # -- inference ----------------------------------------------------------------

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(self, name: str, request: Request, version: str | None = None) -> Response:
        try:
            desc = await self._desc(name, version)
            protocol.check_content_length(request.headers.get("content-length"),
                                          max_body_bytes=self.http.max_body_bytes)
            body = await self._read_body(request)
            parsed = protocol.parse_infer_request(
                body, content_type=request.headers.get("content-type"),
                header_length=request.headers.get(protocol.HEADER_LENGTH_HEADER),
                desc=desc, max_body_bytes=self.http.max_body_bytes)
            outputs = await self.handles[name].infer.remote(parsed.inputs)
            payload, headers = protocol.encode_infer_response(name, outputs, parsed, model_version=MODEL_VERSION)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status; 500 only for bugs
            return _error(exc, self.http.retry_after_s)
        return Response(payload, status_code=200, headers=headers,
                        media_type=headers.pop("Content-Type", "application/json"))

    async def _read_body(self, request: Request) -> bytes:
        # Read in pieces and stop at the limit, whatever Content-Length claimed.
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.http.max_body_bytes:
                raise protocol.ProtocolError(
                    413, f"request body is over the limit of {self.http.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- Ebb's own views ----------------------------------------------------------

    @api.get("/ebb/status")
    async def status(self) -> Response:
        """The coordinator's view (GPUs, replicas, decisions) as JSON."""
        from deployments.coordinator import get_existing

        try:
            coordinator = get_existing(self.coordinator_namespace)
            return JSONResponse(await coordinator.status.remote())
        except Exception as exc:  # noqa: BLE001 - no coordinator yet is a state, not a bug
            return JSONResponse({"error": f"coordinator unavailable: {exc}"}, status_code=503)
