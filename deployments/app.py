"""The application builder ``cluster.yaml`` points at: ``deployments.app:build_app``.

Serve calls it with the application's ``args``; it validates them (an unknown key
fails here, with its path) and binds one ``ModelDeployment`` per model without a
group, named after the model, one ``GroupDeployment`` per group, named after the
group, and the HTTP ingress. Serve then applies the YAML's ``deployments:`` options
(replicas, GPUs, autoscaling, ``user_config``) to those names.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import AppConfig, ConfigError, parse_app_config
from deployments.group import GroupDeployment
from deployments.ingress import EbbIngress
from deployments.model import ModelDeployment


def build_app(args: dict[str, Any]) -> Application:
    cfg = parse_app_config(args)
    return bind(cfg)


def bind(cfg: AppConfig, deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """Bind the application; ``deployment_options`` (by deployment name) are passed to
    ``.options()``, as Serve does with a config file's ``deployments:`` list, for
    callers that deploy in-process (the demo, tests) rather than through ``serve run``."""
    opts = deployment_options or {}
    app_dump = cfg.dump_for_replicas()
    specs: dict[str, tuple[Any, tuple]] = {
        m.name: (ModelDeployment, (m.model_dump(mode="json"), app_dump)) for m in cfg.models if m.group is None}
    for g in cfg.groups:
        specs[g.name] = (GroupDeployment, (g.model_dump(mode="json"),
                                           [m.model_dump(mode="json") for m in cfg.group_models(g.name)], app_dump))
    embedded = None
    if cfg.embed is not None:
        # Built by each ingress replica in its own process (deployments.local_handle):
        # no deployment of its own, so Serve's options for it belong to EbbIngress.
        if cfg.embed in opts:
            raise ConfigError(f"deployments: {cfg.embed!r} runs inside EbbIngress (args.embed), so it has no "
                              f"deployment of its own; move its options (GPUs, replicas, user_config) to "
                              f"EbbIngress's entry")
        kind, init_args = specs.pop(cfg.embed)
        models = [m.model_dump(mode="json") for m in cfg.models if cfg.embed in (m.name, m.group)]
        embedded = {"name": cfg.embed, "cls": kind.func_or_class, "args": init_args, "models": models}
    handles = {name: kind.options(**{**opts.get(name, {}), "name": name}).bind(*init_args)
               for name, (kind, init_args) in specs.items()}
    model_groups = {m.name: m.group for m in cfg.models if m.group is not None}
    ingress = EbbIngress.options(**opts["EbbIngress"]) if "EbbIngress" in opts else EbbIngress
    return ingress.bind(handles, cfg.http.model_dump(), cfg.coordinator.namespace, model_groups, embedded)


def from_serve_config(path: str, app_name: str | None = None) -> tuple[str, str, Application, dict]:
    """Read a Serve config file (``cluster.yaml``) and bind its Ebb application.

    Returns ``(app name, route prefix, application, http_options)``. ``serve run`` and
    ``serve deploy`` do not need this: they read the file themselves.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    apps = [a for a in doc.get("applications", []) if a.get("import_path") == "deployments.app:build_app"]
    if app_name is not None:
        apps = [a for a in apps if a.get("name") == app_name]
    if not apps:
        raise ValueError(f"{path}: no application with import_path deployments.app:build_app"
                         + (f" named {app_name!r}" if app_name else ""))
    app = apps[0]
    options = {}
    for d in app.get("deployments", []):
        d = dict(d)
        options[d.pop("name")] = d
    cfg = parse_app_config(app.get("args", {}))
    return app.get("name", "default"), app.get("route_prefix", "/"), bind(cfg, options), doc.get("http_options", {})
