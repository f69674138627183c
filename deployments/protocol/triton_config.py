"""Triton's model-configuration extension: ``GET /v2/models/{name}/config`` and gRPC ``ModelConfig``.

Triton's own tools (perf_analyzer, model_analyzer, genai-perf) read a model's
configuration before anything else: batch dimension, tensor types and dims. Ebb has
no ``config.pbtxt``; the configuration is derived from the engine's description
and the replica's batching, in Triton's JSON form (the form ``tritonclient``'s
``get_model_config`` returns and ``json_format.ParseDict`` takes for the gRPC answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deployments.protocol.datatypes import datatype_for
from engine_runtime.spec import EngineDescription, TensorSpec

__all__ = ["model_config"]

#: Ebb backend -> Triton's (platform, backend) for the same kind of model.
_TRITON_PLATFORM: Mapping[str, tuple[str, str]] = {
    "pytorch": ("pytorch_libtorch", "pytorch"),
    "tensorrt": ("tensorrt_plan", "tensorrt"),
    "tensorrt-rtx": ("tensorrt_plan", "tensorrt"),
}


def model_config(desc: EngineDescription, *, max_batch_size: int | None = None,
                 max_queue_delay_s: float | None = None) -> dict[str, Any]:
    """Triton's model configuration (JSON form) of an engine.

    ``max_batch_size`` is the profile's maximum batch (every Ebb engine batches on its
    first dimension), so ``dims`` leave the batch dimension out, as Triton's do when
    ``max_batch_size > 0``; -1 marks a dimension the profile bounds. ``max_batch_size``
    and ``max_queue_delay_s`` given: the replica's dynamic batching (Serve's batch size
    and wait), reported as Triton's ``dynamic_batching``.
    """
    platform, backend = _TRITON_PLATFORM.get(desc.backend, (desc.backend, desc.backend))
    config: dict[str, Any] = {
        "name": desc.name,
        "platform": platform,
        "backend": backend,
        "max_batch_size": int(desc.max_batch),
        "input": [_tensor(t, _profile_dims(desc, t)) for t in desc.inputs],
        "output": [_tensor(t, [int(d) for d in t.shape[1:]]) for t in desc.outputs],
        "version_policy": {"latest": {"num_versions": 1}},
    }
    if max_batch_size is not None and max_batch_size > 1:
        batching: dict[str, Any] = {"preferred_batch_size": [int(min(max_batch_size, desc.max_batch))]}
        if max_queue_delay_s is not None:
            batching["max_queue_delay_microseconds"] = round(max_queue_delay_s * 1e6)
        config["dynamic_batching"] = batching
    return config


def _profile_dims(desc: EngineDescription, spec: TensorSpec) -> list[int]:
    """An input's dims after the batch: fixed where the profile's min and max agree, else -1."""
    profile = desc.profiles.get(spec.name)
    if profile is None:
        return [int(d) for d in spec.shape[1:]]
    return [int(lo) if lo == hi else -1 for lo, hi in zip(profile.min[1:], profile.max[1:], strict=True)]


def _tensor(spec: TensorSpec, dims: list[int]) -> dict[str, Any]:
    return {"name": spec.name, "data_type": "TYPE_" + datatype_for(spec.dtype), "dims": dims}
