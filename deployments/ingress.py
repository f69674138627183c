"""The ingress: the Open Inference Protocol (KServe v2) over Ray Serve, HTTP and gRPC.

Routes requests to the model deployments through their handles; a grouped model's
handle is its group's, with the model name as Serve's multiplexed model id. Parsing and
encoding are in ``deployments.protocol`` (pure) and ``deployments.grpc_service``
(protobuf); this module moves bytes and maps exceptions to statuses: client mistakes
4xx, no GPU memory in time 503 with ``Retry-After``, a replica that died mid-call
503, and anything else 500 (a bug). gRPC methods carry the same answers as codes.

The event loop never waits on a body (``deployments.body_intake``: deadlines, limits,
parsing off the loop, large JSON in worker processes): small requests never queue
behind a large one, and stalled uploads cannot take every one of the replica's request
slots. A model or group named by ``args.embed`` runs in this process
(``deployments.local_handle``).
"""

# No ``from __future__ import annotations`` here: FastAPI reads route signatures at
# run time, and under Serve's ingress wrapper string annotations such as "Request"
# do not resolve, turning the request into a required query parameter (HTTP 422).
import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from deployments import protocol
from deployments.body_intake import BodyIntake, is_cancelled

try:
    # tritonclient's protobuf messages; without tritonclient[grpc] the HTTP side still
    # serves (and cluster.yaml's grpc_options, which name this module, must go).
    from deployments import grpc_service
except ImportError:  # pragma: no cover - depends on the environment
    grpc_service = None
from deployments.config import HttpConfig
from deployments.openapi import INFER_OPERATION, METADATA_RESPONSES
from engine_runtime.spec import EngineDescription

logger = logging.getLogger(__name__)

SERVER_NAME = "ebb"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
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


def _status_of(exc: BaseException, retry_after_s: int) -> tuple[int, str, dict[str, str]]:
    exc = _unwrap(exc)
    if is_cancelled(exc):
        exc = protocol.ClientDisconnected(0)
    if isinstance(exc, protocol.ClientDisconnected):
        # The client's own choice; nobody reads this answer. Not an internal error.
        logger.info("%s", exc.message)
    if _is_replica_gone(exc):
        return 503, f"model replica unavailable: {type(exc).__name__}", {"Retry-After": str(retry_after_s)}
    return protocol.http_status_for(exc)


def _error(exc: BaseException, retry_after_s: int) -> Response:
    status, message, headers = _status_of(exc, retry_after_s)
    return Response(protocol.error_body(message), status_code=status, headers=headers,
                    media_type="application/json")


def _grpc_error(context: Any, exc: BaseException, retry_after_s: int, empty: Any) -> Any:
    """Answer a gRPC call that raised ``exc`` with the code HTTP's status maps to."""
    status, message, _ = _status_of(exc, retry_after_s)
    if context is not None:
        context.set_code(grpc.StatusCode[protocol.grpc_code_for(status)])
        context.set_details(message)
    return empty


def _by_value_handles(handles: dict[str, Any]) -> dict[str, Any]:
    """Each model's handle that sends a call by value, over the gRPC server every Serve
    replica runs, instead of by reference (the arguments put in Ray's object store and
    the call made as an actor task).

    Why: measured on the CPU machine (docs/benchmarks.md §12), a ResNet-sized request
    (600 KB) took 3.0 ms by value against 5.9 ms by reference; by value loses from about
    2 MB (2.4 MB: 7.8 against 7.2 ms) and collapses at 4.8 MB (138 ms), hence
    ``http.by_value_max_bytes``. ``_by_reference`` is Serve's own option, underscored
    (experimental): where this Serve has no such option, every call goes by reference.
    """
    try:
        return {name: h.options(_by_reference=False) for name, h in handles.items()}
    except TypeError as err:  # pragma: no cover - depends on the Serve installed
        logger.warning("Serve's handles have no by-value option (%s): every call goes by reference", err)
        return {}


def _payload_bytes(arrays: dict[str, Any]) -> int:
    """What a request's tensors weigh on the wire: ``nbytes``, except for object arrays
    (BYTES tensors), whose ``nbytes`` counts pointers, not the strings they hold."""
    total = 0
    for a in arrays.values():
        if a.dtype == object:
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in a.ravel())
        else:
            total += a.nbytes
    return total


@dataclass
class _ModelCounters:
    """Per model, at this ingress replica: Triton's statistics extension reads these."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    inference_count: int = 0
    last_inference_ms: int = 0


#: Serve runs a replica's code on a second event loop, in a thread of its own, by default,
#: so every request crosses threads on its way in and again on its way out (a wake-up of
#: the other loop each time). The ingress never blocks its loop (bodies are parsed off it,
#: engines run on the batcher's thread), so it can run on Serve's own loop (measured in
#: docs/benchmarks.md §14).
#: Serve reads this when the replica starts, so it travels in the replica's runtime_env
#: (cluster.yaml's EbbIngress entry; a config's ray_actor_options replace these).
SAME_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


@serve.deployment(ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": SAME_LOOP_ENV}},
                  max_ongoing_requests=256)
@serve.ingress(api)
class EbbIngress:
    def __init__(self, handles: dict[str, Any], http: dict, coordinator_namespace: str = "ebb",
                 model_groups: dict[str, str] | None = None, embedded: dict | None = None) -> None:
        from deployments.heap import keep_heap_for_requests
        from deployments.replica import log_to_replica_file

        log_to_replica_file()
        keep_heap_for_requests()
        if os.environ.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1") != "0":
            logger.info("EbbIngress runs on Serve's second event loop (Serve's default): a thread hop per "
                        "request each way. Its ray_actor_options.runtime_env.env_vars can take %s to run it on "
                        "Serve's own loop (cluster.yaml does; docs/serving.md)", SAME_LOOP_ENV)
        #: ``args.embed``'s replica, built in this process (deployments.local_handle); None without.
        self._embedded = None
        if embedded is not None:
            from deployments.local_handle import build_embedded

            self._embedded = build_embedded(embedded)
            handles = {**handles, embedded["name"]: self._embedded}
        groups = model_groups or {}
        group_names = set(groups.values())
        #: Model name -> the handle that serves it (a group's, routed by the model id).
        self.handles = {name: h for name, h in handles.items() if name not in group_names}
        self.handles.update({model: handles[group].options(multiplexed_model_id=model)
                             for model, group in groups.items()})
        self.http = HttpConfig.model_validate(http)
        self._by_value = _by_value_handles(self.handles) if self.http.by_value_max_bytes else {}
        self.coordinator_namespace = coordinator_namespace
        self._descs: dict[str, EngineDescription] = {}
        self.intake = BodyIntake(self.http)
        self._counters = {name: _ModelCounters() for name in self.handles}

    async def _desc(self, name: str, version: str | None) -> EngineDescription:
        if name not in self.handles or (version is not None and version != MODEL_VERSION):
            raise protocol.ModelNotFound(name, list(self.handles), version)
        if name not in self._descs:
            self._descs[name] = await self.handles[name].describe.remote()
        return self._descs[name]

    # -- Python callers (deployment handles) --------------------------------------------

    async def infer_model(self, model: str, inputs: dict[str, Any], version: str | None = None) -> dict[str, Any]:
        """Named arrays in, named numpy arrays out, as a model deployment's ``infer``, for
        any model this app serves: the way a handle reaches a model embedded in the
        ingress (``args.embed``), which has no deployment of its own. Raises what the
        model's ``infer`` raises; ``ModelNotFound`` for a model the app does not serve."""
        if model not in self.handles or (version is not None and version != MODEL_VERSION):
            raise protocol.ModelNotFound(model, list(self.handles), version)
        return await self.handles[model].infer.remote(inputs)

    # -- Serve's replica hooks, for the embedded replica (args.embed) ---------------

    def reconfigure(self, user_config: dict) -> None:
        """EbbIngress's ``user_config`` is its embedded model's or group's (``mode``, ``pin``,
        batching, ``weights``); without one there is nothing it could apply."""
        if self._embedded is not None:
            self._embedded.target.reconfigure(user_config)
        elif user_config:
            raise ValueError(f"user_config of EbbIngress: {sorted(user_config)} apply to a model, and this "
                             f"ingress embeds none (args.embed); set them on the model's deployment")

    def check_health(self) -> None:
        if self._embedded is not None:
            self._embedded.target.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The embedded replica's figures for Ebb's memory-aware policy (none without one)."""
        if self._embedded is None:
            return {}
        return await self._embedded.target.record_autoscaling_stats()

    def timings(self, reset: bool = False) -> dict[str, dict[str, float | int]]:
        """The embedded replica's call path (``deployments.call_path``), as a model
        replica's ``timings`` gives it."""
        if self._embedded is None:
            raise ValueError("this ingress embeds no model (args.embed): ask the model's deployment")
        return self._embedded.target.timings(reset)

    def __del__(self) -> None:
        embedded, self._embedded = getattr(self, "_embedded", None), None
        if embedded is not None:
            # Its engines, pool lease and admission budget go back before the process does.
            embedded.target.shutdown()
        # Serve's graceful shutdown calls __del__, then kills the process: the body
        # intake's worker pools go while the process lives (body_intake.BodyIntake.close).
        intake = getattr(self, "intake", None)
        if intake is not None:
            intake.close()

    async def _call(self, name: str, desc: EngineDescription, parsed: protocol.InferRequest) -> dict:
        counters = self._counters[name]
        started = time.perf_counter_ns()
        nbytes = _payload_bytes(parsed.inputs)
        handle = self._by_value.get(name) if nbytes <= self.http.by_value_max_bytes else None
        try:
            outputs = await (handle or self.handles[name]).infer.remote(parsed.checked(desc))
        except BaseException:
            counters.fail_count += 1
            raise
        counters.success_count += 1
        counters.success_ns += time.perf_counter_ns() - started
        counters.inference_count += next(iter(parsed.inputs.values())).shape[0] if parsed.inputs else 0
        counters.last_inference_ms = int(time.time() * 1e3)
        return outputs

    # -- health and metadata ------------------------------------------------------

    @api.get("/v2")
    async def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": SERVER_EXTENSIONS}

    @api.get("/v2/health/live")
    async def live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(status_code=200 if await self._all_ready() else 503)

    async def _all_ready(self) -> bool:
        return all(await asyncio.gather(*(self._model_ready(n) for n in self.handles)))

    async def _model_ready(self, name: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handles[name].ready.remote(), timeout=5.0))
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
            return False

    # -- Triton's model repository extension: the index (deployments.protocol.repository) --

    @api.post("/v2/repository/index")
    async def repository_index(self, request: Request) -> Response:
        """Every served model and its state (``{"ready": true}``: the ready ones only)."""
        try:
            ready_only = protocol.parse_index_request(await request.body())
            return JSONResponse(await self._index(ready_only))
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            return _error(exc, self.http.retry_after_s)

    async def _index(self, ready_only: bool) -> list[dict]:
        names = sorted(self.handles)
        ready = await asyncio.gather(*(self._model_ready(n) for n in names))
        return protocol.repository_index(dict(zip(names, ready)), MODEL_VERSION, ready_only)

    @api.post("/v2/repository/models/{name}/load")
    @api.post("/v2/repository/models/{name}/unload")
    async def model_control(self, name: str, request: Request) -> Response:
        action = request.url.path.rsplit("/", 1)[-1]
        return _error(protocol.model_control_refused(name, action), self.http.retry_after_s)

    # Before /v2/models/{name}: "stats" here is the route, not a model.
    @api.get("/v2/models/stats")
    @api.get("/v2/models/{name}/stats", responses=METADATA_RESPONSES)
    @api.get("/v2/models/{name}/versions/{version}/stats", responses=METADATA_RESPONSES)
    async def model_statistics(self, name: str | None = None, version: str | None = None) -> Response:
        try:
            return JSONResponse(self._statistics(name, version))
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            return _error(exc, self.http.retry_after_s)

    def _statistics(self, name: str | None, version: str | None) -> dict:
        if name is not None and (name not in self.handles or (version not in (None, "", MODEL_VERSION))):
            raise protocol.ModelNotFound(name, list(self.handles), version)
        names = [name] if name is not None else sorted(self.handles)
        return {"model_stats": [protocol.model_statistics(n, MODEL_VERSION, **vars(self._counters[n]))
                                for n in names]}

    @api.get("/v2/models/{name}", responses=METADATA_RESPONSES)
    @api.get("/v2/models/{name}/versions/{version}", responses=METADATA_RESPONSES)
    async def model_metadata(self, name: str, version: str | None = None) -> Response:
        try:
            desc = await self._desc(name, version)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            return _error(exc, self.http.retry_after_s)
        return JSONResponse(protocol.model_metadata(desc, versions=[MODEL_VERSION]))

    @api.get("/v2/models/{name}/config", responses=METADATA_RESPONSES)
    @api.get("/v2/models/{name}/versions/{version}/config", responses=METADATA_RESPONSES)
    async def model_config(self, name: str, version: str | None = None) -> Response:
        """Triton's model configuration, derived from the engine (perf_analyzer reads it first)."""
        try:
            return JSONResponse(await self._config(name, version))
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            return _error(exc, self.http.retry_after_s)

    async def _config(self, name: str, version: str | None) -> dict:
        desc = await self._desc(name, version)
        batching = await self.handles[name].batching.remote()
        return protocol.model_config(desc, max_batch_size=batching["max_batch_size"],
                                     max_queue_delay_s=batching["batch_wait_timeout_s"])

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(self, name: str, version: str | None = None) -> Response:
        if name not in self.handles or (version is not None and version != MODEL_VERSION):
            return _error(protocol.ModelNotFound(name, list(self.handles), version), self.http.retry_after_s)
        return Response(status_code=200 if await self._model_ready(name) else 503)

    # -- inference ----------------------------------------------------------------

    @api.post("/v2/models/{name}/infer", openapi_extra=INFER_OPERATION)
    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_OPERATION)
    async def infer(self, name: str, request: Request, version: str | None = None) -> Response:
        size = 0
        try:
            desc = await self._desc(name, version)
            header_length = request.headers.get(protocol.HEADER_LENGTH_HEADER)
            body = await self.intake.read(request, json=header_length is None)
            size = len(body)
            parse = functools.partial(
                protocol.parse_infer_request, content_type=request.headers.get("content-type"),
                header_length=header_length, desc=desc, max_body_bytes=self.http.max_body_bytes,
                # NaN and infinity are the model's rule (reject_non_finite), applied by its replica.
                reject_non_finite=False)
            parsed = await self.intake.parse(parse, body, binary=header_length is not None)
            del body  # binary tensors are views of it: it lives on in ``parsed``
            outputs = await self._call(name, desc, parsed)
            out_bytes = sum(getattr(v, "nbytes", 0) for v in outputs.values())
            payload, headers = await self.intake.off_loop(out_bytes, protocol.encode_infer_response, name, outputs,
                                                    parsed, model_version=MODEL_VERSION)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status; 500 only for bugs
            return _error(exc, self.http.retry_after_s)
        finally:
            self.intake.trim_after(size)
        return Response(payload, status_code=200, headers=headers,
                        media_type=headers.pop("Content-Type", "application/json"))

    # -- KServe v2 gRPC (inference.GRPCInferenceService; deployments.grpc_service) --

    async def ServerLive(self, request: Any) -> Any:  # gRPC method names: Serve calls the method named as the RPC
        return grpc_service.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:
        return grpc_service.pb.ServerReadyResponse(ready=await self._all_ready())

    async def ServerMetadata(self, request: Any) -> Any:
        return grpc_service.pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                                      extensions=SERVER_EXTENSIONS)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:
        version = request.version or None
        if request.name not in self.handles or (version is not None and version != MODEL_VERSION):
            return _grpc_error(grpc_context, protocol.ModelNotFound(request.name, list(self.handles), version),
                               self.http.retry_after_s, grpc_service.pb.ModelReadyResponse())
        return grpc_service.pb.ModelReadyResponse(ready=await self._model_ready(request.name))

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            desc = await self._desc(request.name, request.version or None)
            return grpc_service.model_metadata_response(protocol.model_metadata(desc, versions=[MODEL_VERSION]))
        except Exception as exc:  # noqa: BLE001 - mapped to a code
            return _grpc_error(grpc_context, exc, self.http.retry_after_s, grpc_service.pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            return grpc_service.model_config_response(await self._config(request.name, request.version or None))
        except Exception as exc:  # noqa: BLE001 - mapped to a code
            return _grpc_error(grpc_context, exc, self.http.retry_after_s, grpc_service.pb.ModelConfigResponse())

    async def ModelStatistics(self, request: Any, grpc_context: Any = None) -> Any:
        from google.protobuf import json_format

        try:
            body = self._statistics(request.name or None, request.version or None)
            return json_format.ParseDict(body, grpc_service.pb.ModelStatisticsResponse())
        except Exception as exc:  # noqa: BLE001 - mapped to a code
            return _grpc_error(grpc_context, exc, self.http.retry_after_s,
                               grpc_service.pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, grpc_context: Any = None) -> Any:
        entries = await self._index(bool(request.ready))
        return grpc_service.pb.RepositoryIndexResponse(
            models=[grpc_service.pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def RepositoryModelLoad(self, request: Any, grpc_context: Any = None) -> Any:
        return _grpc_error(grpc_context, protocol.model_control_refused(request.model_name, "load"),
                           self.http.retry_after_s, grpc_service.pb.RepositoryModelLoadResponse())

    async def RepositoryModelUnload(self, request: Any, grpc_context: Any = None) -> Any:
        return _grpc_error(grpc_context, protocol.model_control_refused(request.model_name, "unload"),
                           self.http.retry_after_s, grpc_service.pb.RepositoryModelUnloadResponse())

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:
        name, size = request.model_name, 0
        try:
            desc = await self._desc(name, request.model_version or None)
            raw = grpc_service.raw_contents(request)
            size = grpc_service.request_bytes(request, raw)
            if size > self.http.max_body_bytes:
                raise protocol.ProtocolError(413, f"request is {size} bytes, over the limit of "
                                                  f"{self.http.max_body_bytes} bytes")
            # Typed contents are converted element by element (off the loop when large);
            # raw_input_contents become views, parsed on the loop up to its own limit.
            parsed = await self.intake.off_loop(size, grpc_service.parse_model_infer, request, desc, raw,
                                                binary=raw is not None)
            outputs = await self._call(name, desc, parsed)
            names = [o.name for o in parsed.outputs] if parsed.outputs else list(outputs)
            return grpc_service.infer_response(name, MODEL_VERSION, parsed.id, outputs, names)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code; INTERNAL only for bugs
            return _grpc_error(grpc_context, exc, self.http.retry_after_s, grpc_service.pb.ModelInferResponse())
        finally:
            self.intake.trim_after(size)

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
