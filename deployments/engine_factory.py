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
from engine_runtime.device import graph_arena_available
from engine_runtime.engine import BaseEngine
from engine_runtime.memory import Admission, PhysicalSource, UnboundedAdmission
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


#: What a replica's status says when it leases from its GPU's pool.
POOL_IN_USE = "in use"


def join_context_pool(model: ModelConfig, app: AppConfig, cuda_index: int | None) -> tuple[PoolPhysical | None, str]:
    """Join this GPU's context pool where the config asks for it and the engine can use it.

    Returns the client (``None`` where the engine keeps its own mechanism) and what the
    status view says: :data:`POOL_IN_USE`, or why not. Never raises for a pool that
    cannot be had: the replica serves with its own mechanism then.
    """
    cfg = app.context_pool
    if not cfg.enabled:
        return None, "not used: disabled in the config (context_pool.enabled)"
    if cuda_index is None:
        return None, "unavailable: this replica has no CUDA device"
    support = pool_available(cuda_index)  # cheap, and first: the checks below assume a GPU
    if not support:
        logger.warning("model %s: context pool unavailable on cuda:%d, keeping the engine's own mechanism: %s",
                       model.name, cuda_index, support.reason)
        return None, f"unavailable: {support.reason}"
    if choose_backend(model) == "pytorch":
        if model.device not in ("auto", "cuda", f"cuda:{cuda_index}"):
            return None, f"unavailable: the model runs on {model.device!r}, not on the replica's cuda:{cuda_index}"
        if not graph_arena_available():
            # Without its arena the PyTorch backend runs eagerly and would never lease.
            return None, "unavailable: the PyTorch backend's CUDA-graph arena needs a C compiler"
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
        return None, f"unavailable: {err.reason}"
    return client, POOL_IN_USE


def make_engine(model: ModelConfig, app: AppConfig, *, admission: Admission | None = None,
                cuda_index: int | None = None, physical_source: PhysicalSource | None = None) -> BaseEngine:
    """Build the engine object; nothing touches the GPU until ``warm()`` or a call.

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
                  reject_non_finite=model.reject_non_finite)
    if backend == "pytorch":
        if not isinstance(model.source, ArchitectureSource):
            raise ConfigError(f"model {model.name!r}: the pytorch backend serves architectures only; "
                              f"{type(model.source).__name__} needs backend 'tensorrt'")
        from engine_runtime.backends.pytorch import PyTorchEngine

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
    from engine_runtime.backends.tensorrt import TensorRTEngine

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
