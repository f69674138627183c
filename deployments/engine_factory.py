"""Turn one validated ``ModelConfig`` into an ``engine_runtime`` engine.

The only place where config vocabulary (source kinds, backend names) meets engine
constructors; replicas, tests and the demo all build engines through here.
"""

from __future__ import annotations

import importlib.util
import logging

from deployments.config import AppConfig, ArchitectureSource, ConfigError, ModelConfig, OnnxSource, PlanSource, \
    resolve_model_path
from engine_runtime.admission import Admission
from engine_runtime.engine import BaseEngine

logger = logging.getLogger(__name__)


def tensorrt_installed() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))


def choose_backend(model: ModelConfig) -> str:
    if model.backend != "auto":
        return model.backend
    if isinstance(model.source, ArchitectureSource):
        return "pytorch"
    return "tensorrt"


def make_engine(model: ModelConfig, app: AppConfig, *, admission: Admission | None = None,
                cuda_index: int | None = None) -> BaseEngine:
    """Build the engine object; nothing touches the GPU until ``warm()`` or a call."""
    backend = choose_backend(model)
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
            device=device, **common)
    if not tensorrt_installed():
        raise ConfigError(f"model {model.name!r}: backend 'tensorrt' needs the tensorrt or tensorrt_rtx "
                          f"package (pip install 'ebb[tensorrt]')")
    from engine_runtime.backends.tensorrt import TensorRTEngine

    device_index = cuda_index if cuda_index is not None else 0
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
