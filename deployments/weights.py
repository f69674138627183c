"""New weights for a running model: the ``weights`` key of a deployment's ``user_config``.

``reconfigure`` hands it here to be validated and read, then to the engine's
``update_weights`` (PyTorch: copied into the existing tensors; TensorRT: refit), so
replicas take new weights in place, between two calls, without a restart::

    user_config:
      weights: {path: resnet18-v2.pt, version: v2}     # a state dict inside model_dirs
      weights: {seed: 7}                               # built-in architectures: new random weights

Files are read without unpickling code: ``.pt``/``.pth``/``.bin`` with
``torch.load(weights_only=True)``, ``.npz`` with ``allow_pickle=False``, ``.safetensors``
with safetensors (when installed). Serve calls ``reconfigure`` with the whole
``user_config`` whenever any key changes, so an update is applied once per
``version`` (default: the path, or ``seed-N``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.config import AppConfig, ArchitectureSource, ConfigError, ModelConfig, resolve_model_path
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)

#: File suffixes read as weights, and how.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".npz", ".safetensors")


class WeightsUpdate(BaseModel):
    """``user_config.weights``: where the new weights come from (exactly one source)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(None, description="State dict file (.pt/.pth/.bin/.npz/.safetensors) inside model_dirs.")
    seed: int | None = Field(None, description="Built-in architectures only: fresh random weights from this seed.")
    version: str | None = Field(None, min_length=1, max_length=128,
                                description="Applied once per version; default the path or seed-N.")

    @model_validator(mode="after")
    def _one_source(self) -> WeightsUpdate:
        if (self.path is None) == (self.seed is None):
            raise ValueError("give exactly one of path or seed")
        if self.path is not None and not self.path.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"path must end in one of {list(WEIGHT_SUFFIXES)}, got {self.path!r}")
        return self

    @property
    def key(self) -> str:
        """What identifies this update: an update with the key already applied is skipped."""
        return self.version or (self.path if self.path is not None else f"seed-{self.seed}")


def parse_weights_update(raw: Any, model_name: str) -> WeightsUpdate:
    """Validate ``user_config.weights``; raise ConfigError naming each bad key's path."""
    try:
        return WeightsUpdate.model_validate(raw)
    except ValidationError as err:
        lines = [f"  user_config.weights{''.join('.' + str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"user_config of {model_name!r}: invalid weights:\n" + "\n".join(lines)) from None


def load_weights(update: WeightsUpdate, model: ModelConfig, app: AppConfig) -> dict[str, Any]:
    """The named tensors of ``update``, on the host, ready for ``engine.update_weights``."""
    if update.seed is not None:
        if not isinstance(model.source, ArchitectureSource):
            raise ConfigError(f"user_config.weights.seed of {model.name!r}: seeds make weights for built-in "
                              f"architectures only; give weights.path for a {type(model.source).__name__}")
        from engine_runtime.architectures import build

        built = build(model.source.architecture, seed=update.seed, image_size=model.input.image_size,
                      seq_len=model.input.seq_len)
        return dict(built.module.state_dict())
    path = resolve_model_path(update.path, app.model_dirs)
    weights = _read(path)
    nbytes = sum(int(getattr(t, "nbytes", 0)) for t in weights.values())
    logger.info("read %d weight tensors (%.1f MiB) from %s", len(weights), nbytes / MiB, path)
    return weights


def _read(path: Path) -> dict[str, Any]:
    suffix = path.suffix
    try:
        if suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        if suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ConfigError(f"{path}: reading .safetensors needs the safetensors package "
                                  f"(pip install safetensors), or save the weights as .pt") from None
            return dict(load_file(str(path), device="cpu"))
        import torch

        # weights_only: tensors and plain containers, never arbitrary pickled objects.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - every reader has its own error types
        raise ConfigError(f"cannot read weights from {path}: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{path}: expected a state dict (names to tensors), got {type(data).__name__}")
    return data
