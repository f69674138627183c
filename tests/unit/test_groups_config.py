"""Groups in the application's args: ``groups: [{name, ...}]`` and ``models[].group``.

Every inconsistency fails the deploy with the key path that names it, as a
misspelled key does; a model without a group keeps its own deployment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.config import ConfigError, parse_app_config

ROOT = Path(__file__).resolve().parents[2]


def model(name: str, **extra):
    return {"name": name, "source": {"architecture": "resnet18", "seed": 0}, **extra}


def args(models, groups, **extra):
    return {"models": models, "groups": groups, **extra}


def test_a_group_binds_one_deployment_for_its_models_and_ungrouped_models_keep_theirs():
    cfg = parse_app_config(args([model("a", group="g"), model("b"), model("c", group="g")],
                                [{"name": "g", "gpu_weights_budget_bytes": 1 << 30}]))
    assert cfg.deployment_names() == ["b", "g"]
    assert [m.name for m in cfg.group_models("g")] == ["a", "c"]
    g = cfg.group("g")
    assert (g.gpu_weights_budget_bytes, g.host_tier, g.mode, g.pin) == (1 << 30, True, "dynamic", "auto")


def test_no_groups_is_the_config_of_before():
    cfg = parse_app_config({"models": [model("a")]})
    assert cfg.groups == [] and cfg.deployment_names() == ["a"]


@pytest.mark.parametrize("models, groups, expected", [
    ([model("a", group="nope")], [],
     r"models\.0\.group: unknown group 'nope'; groups: \[\]"),
    ([model("a", group="g")], [{"name": "g"}, {"name": "empty"}],
     r"groups\.1: group 'empty' has no models"),
    ([model("a", group="g"), model("g")], [{"name": "g"}],
     r"groups\.0\.name: 'g' is also the name of models\.1"),
    ([model("a", group="g")], [{"name": "g"}, {"name": "g"}],
     r"groups\.1\.name: 'g' is already the name of groups\.0"),
    ([model("a", group="EbbIngress")], [{"name": "EbbIngress"}],
     r"groups\.0\.name: 'EbbIngress' is reserved"),
    ([model("a", group="g", mode="static")], [{"name": "g"}],
     r"models\.0\.mode: model 'a' is in group 'g', whose replicas share one mode: set groups\.0\.mode"),
    ([model("a", group="g", batching={"max_batch_size": 2})], [{"name": "g"}],
     r"models\.0\.batching: .* set groups\.0\.batching"),
    ([model("a", group="g")], [{"name": "g", "budget": 3}],
     r"groups\.0\.budget: Extra inputs are not permitted"),
    ([model("a", group="g")], [{"name": "g", "gpu_weights_budget_bytes": 0}],
     r"groups\.0\.gpu_weights_budget_bytes: Input should be greater than 0"),
    ([model("a", group="g")], [{"name": "../g"}],
     r"groups\.0\.name: String should match pattern"),
])
def test_inconsistent_groups_fail_with_their_key_path(models, groups, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_app_config(args(models, groups))


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        parse_app_config(args([model("a", group="x"), model("b", group="g", pin="static")],
                              [{"name": "g"}, {"name": "lonely"}]))
    lines = str(err.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["groups.1", "models.0.group", "models.1.pin"]


def test_the_cuda_stack_limit_defaults_to_the_measured_256_bytes_and_may_be_left_alone():
    assert parse_app_config({"models": [model("a")]}).cuda.stack_limit_bytes == 256
    assert parse_app_config({"models": [model("a")], "cuda": {"stack_limit_bytes": None}}).cuda.stack_limit_bytes \
        is None
    with pytest.raises(ConfigError, match=r"cuda\.stack_limit_bytes: Input should be greater than 0"):
        parse_app_config({"models": [model("a")], "cuda": {"stack_limit_bytes": 0}})


def test_the_groups_example_is_a_valid_serve_config_whose_deployments_name_groups():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "docs" / "examples" / "groups.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    app = next(a for a in doc["applications"] if a["import_path"] == "deployments.app:build_app")
    cfg = parse_app_config(app["args"])
    assert cfg.groups, "the example is about groups"
    assert {d["name"] for d in app["deployments"]} == set(cfg.deployment_names()) | {"EbbIngress"}
    assert all(len(cfg.group_models(g.name)) >= 2 for g in cfg.groups)


def test_replicas_validate_the_same_config_again():
    cfg = parse_app_config(args([model("a", group="g", lazy=False), model("b", mode="static")],
                                [{"name": "g", "mode": "static", "gpu_weights_budget_bytes": 1 << 30}]))
    from deployments.config import AppConfig

    assert AppConfig.model_validate(cfg.dump_for_replicas()) == cfg
