"""Turn one validated ``ModelConfig`` into an ``engine_runtime`` engine.

The only place where config vocabulary (source kinds, backend names) meets engine
constructors; replicas, tests and the demo all build engines through here. That
includes where context memory comes from: the GPU's shared pool
(:func:`join_context_pool`) or the engine's own mechanism.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys

from deployments.config import AppConfig, ArchitectureSource, ConfigError, ModelConfig, OnnxSource, PlanSource, \
    resolve_model_path
from engine_runtime.device import graph_arena_available, vmm_supported
from engine_runtime import BaseEngine
from engine_runtime.memory import (
    POOL_IN_USE,
    Admission,
    BackendKind,
    ContextFacts,
    ContextPlan,
    PhysicalSource,
    UnboundedAdmission,
    plan_context,
)
from engine_runtime.memory.pool import PoolPhysical, PoolUnavailableError, connect_or_start, pool_available

logger = logging.getLogger(__name__)


def tensorrt_installed() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))


def choose_backend(model: ModelConfig) -> str:
    if model.backend != "auto":
        return model.backend
    if isinstance(model.source, ArchitectureSource):
        return "pytorch"
    return "tensorrt"


def context_facts(model: ModelConfig, app: AppConfig, cuda_index: int | None) -> ContextFacts:
    """What decides how the replica's engine obtains context memory, gathered on this host.

    Cheap checks first: the pool's probe runs only where the config enables the pool
    and the replica has a GPU.
    """
    backend = BackendKind(choose_backend(model))
    device_index = _engine_device(model, backend, cuda_index)
    vmm = device_index is not None and vmm_supported(device_index)
    # Only where VMM is: the arena needs it, and loading the capture allocator needs CUDA torch.
    graph_arena = backend is BackendKind.PYTORCH and vmm and graph_arena_available()
    unavailable = None
    if app.context_pool.enabled:
        if cuda_index is None:
            unavailable = "this replica has no CUDA device"
        elif not (support := pool_available(cuda_index)):
            unavailable = support.reason
        elif device_index != cuda_index:
            unavailable = f"the model runs on {model.device!r}, not on the replica's cuda:{cuda_index}"
    return ContextFacts(backend, device_index, vmm=vmm, graph_arena=graph_arena,
                        pool_enabled=app.context_pool.enabled, pool_unavailable=unavailable)


def _engine_device(model: ModelConfig, backend: BackendKind, cuda_index: int | None) -> int | None:
    """The CUDA ordinal the engine will run on (None: the CPU), as :func:`make_engine` places it."""
    if backend is BackendKind.TENSORRT:
        return cuda_index if cuda_index is not None else 0
    if model.device == "cpu" or (model.device == "auto" and cuda_index is None):
        return None
    if model.device in ("auto", "cuda"):
        return cuda_index if cuda_index is not None else 0
    return int(model.device.split(":", 1)[1])


def plan_replica_context(model: ModelConfig, app: AppConfig,
                         cuda_index: int | None) -> tuple[PoolPhysical | None, ContextPlan]:
    """Decide how the replica obtains context memory and join the GPU's pool where the
    plan says so. Never raises for a pool that cannot be had: the plan falls back to the
    engine's own mechanism and its ``pool_status`` says why."""
    facts = context_facts(model, app, cuda_index)
    plan = plan_context(facts)
    logger.info("model %s: context memory via %s (%s)", model.name, plan.mechanism.value, plan.reason)
    if not plan.join_pool:
        if app.context_pool.enabled and plan.pool_status != POOL_IN_USE:
            logger.warning("model %s: context pool %s; keeping the engine's own mechanism", model.name,
                           plan.pool_status)
        return None, plan
    cfg = app.context_pool
    try:
        client = connect_or_start(
            cuda_index, chunk_bytes=cfg.chunk_bytes, initial_chunks=math.ceil(cfg.initial_bytes / cfg.chunk_bytes),
            max_chunks=None if cfg.max_bytes is None else cfg.max_bytes // cfg.chunk_bytes,
            # A lease the pool is too small for grows it, up to the cap; without one, up to
            # the owner's table (the whole card).
            grow_limit_chunks=sys.maxsize if cfg.max_bytes is None else cfg.max_bytes // cfg.chunk_bytes,
            keep_mapped=cfg.keep_mapped)
    except PoolUnavailableError as err:
        logger.warning("model %s: context pool unavailable on cuda:%d, keeping the engine's own mechanism: %s",
                       model.name, cuda_index, err.reason)
        return None, plan_context(facts.without_pool(err.reason))
    return client, plan


def join_context_pool(model: ModelConfig, app: AppConfig, cuda_index: int | None) -> tuple[PoolPhysical | None, str]:
    """Join this GPU's context pool where the config asks for it and the engine can use it.

    Returns the client (``None`` where the engine keeps its own mechanism) and what the
    status view says: :data:`POOL_IN_USE`, or why not (:func:`plan_replica_context`).
    """
    client, plan = plan_replica_context(model, app, cuda_index)
    return client, plan.pool_status


def make_engine(model: ModelConfig, app: AppConfig, *, admission: Admission | None = None,
                cuda_index: int | None = None, physical_source: PhysicalSource | None = None,
                context_plan: ContextPlan | None = None) -> BaseEngine:
    """Build the engine object; no memory is taken on the GPU until ``warm()`` or a call.

    ``context_plan`` (:func:`plan_replica_context`) tells the backend how to obtain
    context memory; without one it plans from the device's facts when it loads.

    With a ``physical_source`` (the GPU's pool) the lease is the admission: a call
    waits for chunks up to the admission deadline, then fails with
    ``ContextMemoryUnavailable``. Waiting on a byte budget as well would only count
    the same bytes twice, and the budget follows free card memory, which the pool's
    free chunks are not part of; so ``admission`` is replaced by an unbounded one.
    """
    backend = choose_backend(model)
    if physical_source is not None:
        admission = UnboundedAdmission()
    common = dict(mode=model.mode, admission=admission,
                  admission_deadline_s=app.coordinator.admission_deadline_s,
                  reject_non_finite=model.reject_non_finite, context_plan=context_plan)
    if backend == "pytorch":
        if not isinstance(model.source, ArchitectureSource):
            raise ConfigError(f"model {model.name!r}: the pytorch backend serves architectures only; "
                              f"{type(model.source).__name__} needs backend 'tensorrt'")
        from engine_runtime.backends import PyTorchEngine

        device = model.device
        if device == "auto":
            device = f"cuda:{cuda_index}" if cuda_index is not None else "cpu"
        p = model.input
        return PyTorchEngine.from_architecture(
            model.name, model.source.architecture, max_batch=p.max_batch, opt_batch=p.opt_batch,
            min_batch=p.min_batch, seed=model.source.seed, image_size=p.image_size, seq_len=p.seq_len,
            device=device, physical_source=physical_source, **common)
    if not tensorrt_installed():
        raise ConfigError(f"model {model.name!r}: backend 'tensorrt' needs the tensorrt or tensorrt_rtx "
                          f"package (pip install 'ebb[tensorrt]')")
    from engine_runtime.backends import TensorRTEngine

    device_index = cuda_index if cuda_index is not None else 0
    if physical_source is not None:
        common["physical_source"] = physical_source
    if isinstance(model.source, PlanSource):
        path = resolve_model_path(model.source.plan, app.model_dirs)
        return TensorRTEngine(model.name, path, device=device_index, **common)
    if isinstance(model.source, OnnxSource):
        from engine_runtime.build import build_from_onnx, profiles_from_onnx

        path = resolve_model_path(model.source.onnx, app.model_dirs)
        p = model.input
        profiles = profiles_from_onnx(path.read_bytes(), p.min_batch, p.opt_batch or p.max_batch, p.max_batch)
        built = build_from_onnx(path, profiles=profiles, precision=model.precision,
                                cache_dir=app.engine_cache_dir)
        return TensorRTEngine(model.name, built.path or built.plan, device=device_index, **common)
    raise ConfigError(f"model {model.name!r}: source {model.source!r} cannot be served by backend {backend!r}")
