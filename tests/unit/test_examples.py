"""The shipped configs stay valid: cluster.yaml for Serve and Ebb, and the KubeRay
example embeds exactly the same Serve config."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.config import parse_app_config

ROOT = Path(__file__).resolve().parents[2]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_serve_config_with_valid_ebb_args():
    from ray.serve.schema import ServeDeploySchema

    doc = _cluster()
    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(doc)
    apps = [a for a in doc["applications"] if a["import_path"] == "deployments.app:build_app"]
    assert apps, "cluster.yaml has no Ebb application"
    cfg = parse_app_config(apps[0]["args"])
    names = {d["name"] for d in apps[0]["deployments"]}
    assert names <= {m.name for m in cfg.models} | {"EbbIngress"}, "deployment options for an unknown model"


def test_rayservice_example_embeds_cluster_yaml():
    manifest = yaml.safe_load((ROOT / "docs" / "examples" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == _cluster()
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(w["replicas"] for w in workers) >= 2, "the example is about several nodes"


def test_embedded_example_is_valid_and_gives_the_group_s_options_to_the_ingress():
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import bind

    doc = yaml.safe_load((ROOT / "docs" / "examples" / "embedded.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    cfg = parse_app_config(app["args"])
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    assert cfg.embed == "resnets" and "resnets" not in options
    assert options["EbbIngress"]["ray_actor_options"]["num_gpus"] > 0  # the group's GPU share
    bind(cfg, options)  # Serve's options name no deployment the app lacks


def test_shipped_configs_run_the_ingress_on_serve_s_own_loop():
    """A config's ray_actor_options replace the deployment's own, so each shipped config
    says it itself (deployments.ingress.SAME_LOOP_ENV: one thread hop less per request)."""
    from deployments.ingress import SAME_LOOP_ENV, EbbIngress

    assert EbbIngress.ray_actor_options["runtime_env"]["env_vars"] == SAME_LOOP_ENV  # bound without a config
    for path in ("cluster.yaml", "docs/examples/groups.yaml", "docs/examples/embedded.yaml"):
        doc = yaml.safe_load((ROOT / path).read_text())
        for app in doc["applications"]:
            (ingress,) = [d for d in app["deployments"] if d["name"] == "EbbIngress"]
            env = ingress["ray_actor_options"]["runtime_env"]["env_vars"]
            assert env == SAME_LOOP_ENV, f"{path}: EbbIngress runs on Serve's second event loop"
