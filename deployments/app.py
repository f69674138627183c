"""The application builder ``cluster.yaml`` points at: ``deployments.app:build_app``.

Serve calls it with the application's ``args``; it validates them (an unknown key
fails here, with its path) and binds one ``ModelDeployment`` per model, named after
the model, plus the HTTP ingress. Serve then applies the YAML's ``deployments:``
options (replicas, GPUs, autoscaling, ``user_config``) to those names.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import AppConfig, parse_app_config
from deployments.ingress import EbbIngress
from deployments.model import ModelDeployment


def build_app(args: dict[str, Any]) -> Application:
    cfg = parse_app_config(args)
    return bind(cfg)


def bind(cfg: AppConfig) -> Application:
    app_dump = cfg.model_dump(mode="json")
    handles = {
        m.name: ModelDeployment.options(name=m.name).bind(m.model_dump(mode="json"), app_dump)
        for m in cfg.models
    }
    return EbbIngress.bind(handles, cfg.http.model_dump(), cfg.coordinator.namespace)
