"""Ebb's Ray floor: Serve deployments, the coordinator, the config and the HTTP protocol.

Public surface: ``build_app`` (the application builder ``cluster.yaml`` names),
``ModelDeployment`` (call ``handle.infer.remote({"input": array})``), ``GroupDeployment``
(call ``handle.options(multiplexed_model_id=model).infer.remote(...)``), the config
models, and ``MemoryAwarePolicy`` (the autoscaling policy ``cluster.yaml`` may name). Imported lazily, so that ``deployments.policy`` and ``deployments.protocol``
stay importable (and testable) without loading Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_app": "deployments.app",
    "ModelDeployment": "deployments.model",
    "GroupDeployment": "deployments.group",
    "MemoryAwarePolicy": "deployments.autoscaling",
    "AppConfig": "deployments.config",
    "ConfigError": "deployments.config",
    "CoordinatorConfig": "deployments.config",
    "CudaConfig": "deployments.config",
    "GroupConfig": "deployments.config",
    "ModelConfig": "deployments.config",
    "parse_app_config": "deployments.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deployments' has no attribute {name!r}")
