"""Which model source runs on which backend is decided once, when the args are parsed:
a mismatch fails the deploy with the model's key path, before any replica starts."""

from __future__ import annotations

import pytest

from deployments.config import ConfigError, parse_app_config

ARCH = {"architecture": "resnet18"}
PLAN = {"plan": "m.plan"}
ONNX = {"onnx": "m.onnx"}


@pytest.mark.parametrize(("source", "backend", "refused"), [
    (ARCH, "auto", None),
    (ARCH, "pytorch", None),
    (ARCH, "tensorrt", "backend 'tensorrt' needs a plan or onnx source"),
    (PLAN, "auto", None),
    (PLAN, "tensorrt", None),
    (PLAN, "pytorch", "a TensorRT plan cannot run on the pytorch backend"),
    (ONNX, "auto", None),
    (ONNX, "tensorrt", None),
    (ONNX, "pytorch", "an ONNX source is built into a TensorRT engine"),
])
def test_a_source_and_backend_mismatch_is_refused_at_parse_time(source, backend, refused):
    args = {"models": [{"name": "ok", "source": ARCH}, {"name": "m", "source": source, "backend": backend}]}
    if refused is None:
        assert parse_app_config(args).models[1].backend == backend
        return
    with pytest.raises(ConfigError) as err:
        parse_app_config(args)
    assert "models.1" in str(err.value) and refused in str(err.value)
