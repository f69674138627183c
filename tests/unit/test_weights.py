"""``user_config.weights`` (``deployments.weights``): validation and safe reading, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.config import AppConfig, ConfigError, ModelConfig
from deployments.weights import load_weights, parse_weights_update

MODEL = ModelConfig(name="encoder", source={"architecture": "bert-tiny"}, input={"max_batch": 2, "seq_len": 8})


def app(tmp_path) -> AppConfig:
    return AppConfig(models=[MODEL], model_dirs=[str(tmp_path)])


@pytest.mark.parametrize("raw, message", [
    ({}, "exactly one of path or seed"),
    ({"path": "a.pt", "seed": 1}, "exactly one of path or seed"),
    ({"seed": 1, "colour": "red"}, "user_config.weights.colour"),
    ({"path": "weights.pkl"}, "must end in one of"),
    ({"seed": 1, "version": ""}, "user_config.weights.version"),
])
def test_invalid_updates_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_weights_update(raw, "encoder")


def test_version_defaults_to_the_source():
    assert parse_weights_update({"seed": 3}, "m").key == "seed-3"
    assert parse_weights_update({"path": "w.pt"}, "m").key == "w.pt"
    assert parse_weights_update({"path": "w.pt", "version": "v9"}, "m").key == "v9"


def test_file_outside_model_dirs_is_refused(tmp_path):
    inside, outside = tmp_path / "models", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    torch.save({"w": torch.zeros(1)}, outside / "w.pt")
    cfg = AppConfig(models=[MODEL], model_dirs=[str(inside)])
    for path in ("../elsewhere/w.pt", str(outside / "w.pt")):
        with pytest.raises(ConfigError, match="not a file inside the model_dirs"):
            load_weights(parse_weights_update({"path": path}, "m"), MODEL, cfg)


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="cannot read weights"):
        load_weights(parse_weights_update({"path": "evil.pt"}, "m"), MODEL, app(tmp_path))


def test_reads_pt_and_npz_state_dicts(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "w.pt")
    np.savez(tmp_path / "w.npz", a=np.ones(2, np.float32))
    for name in ("w.pt", "w.npz"):
        weights = load_weights(parse_weights_update({"path": name}, "m"), MODEL, app(tmp_path))
        assert list(weights) == ["a"] and np.allclose(np.asarray(weights["a"]), 1)


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="expected a state dict"):
        load_weights(parse_weights_update({"path": "list.pt"}, "m"), MODEL, app(tmp_path))


def test_seed_makes_the_architecture_weights_and_needs_an_architecture(tmp_path):
    weights = load_weights(parse_weights_update({"seed": 5}, "m"), MODEL, app(tmp_path))
    assert all(isinstance(t, torch.Tensor) for t in weights.values()) and len(weights) > 4
    plan_model = ModelConfig(name="p", source={"plan": "x.plan"}, backend="tensorrt")
    with pytest.raises(ConfigError, match="built-in architectures only"):
        load_weights(parse_weights_update({"seed": 5}, "p"), plan_model, app(tmp_path))
