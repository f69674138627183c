"""Security properties that can be checked without a cluster.

- HTTP listens on loopback unless configured otherwise (``cluster.yaml``, the demo,
  Serve's own default).
- Model names and engine paths cannot leave ``model_dirs`` (``resolve_model_path``):
  ``..``, absolute paths, symlinks out, NUL bytes, loops.
- Nothing on the request path unpickles or evaluates client data: the modules a
  request goes through are read (as syntax trees) for the calls that would.

The request size limit (HTTP 413) is exercised end to end by
``tests/integration/test_bad_input.py``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

from deployments.config import ConfigError, ModelConfig, resolve_model_path

REPO = Path(__file__).resolve().parents[2]


# -- loopback -----------------------------------------------------------------------------


def test_cluster_yaml_listens_on_loopback():
    doc = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert doc["http_options"]["host"] == "127.0.0.1"


def test_the_demo_serves_where_the_config_says_and_defaults_to_loopback():
    from deployments.app import from_serve_config

    *_, http_options = from_serve_config(str(REPO / "cluster.yaml"))
    assert http_options["host"] == "127.0.0.1"
    # The demo passes that host to serve.start, and loopback when the file has none.
    tree = ast.parse((REPO / "deployments" / "demo.py").read_text())
    gets = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "get" and [ast.literal_eval(a) for a in n.args] == ["host", "127.0.0.1"]]
    assert gets, "deployments/demo.py reads http_options['host'] with a loopback default"


def test_serves_own_default_host_is_loopback():
    from ray.serve.config import HTTPOptions

    assert HTTPOptions().host == "127.0.0.1"


# -- model_dirs -------------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    models, outside = tmp_path / "models", tmp_path / "outside"
    (models / "sub").mkdir(parents=True)
    outside.mkdir()
    (models / "ok.plan").write_bytes(b"plan")
    (models / "sub" / "deep.onnx").write_bytes(b"onnx")
    (outside / "secret.plan").write_bytes(b"secret")
    os.symlink(outside / "secret.plan", models / "link-out.plan")
    os.symlink(outside, models / "dir-out")
    os.symlink(models / "ok.plan", models / "link-in.plan")
    os.symlink(models / "loop-b", models / "loop-a")
    os.symlink(models / "loop-a", models / "loop-b")
    return models, outside


@pytest.mark.parametrize("path, resolves_to", [
    ("ok.plan", "ok.plan"),
    ("sub/deep.onnx", "sub/deep.onnx"),
    ("sub/../ok.plan", "ok.plan"),
    ("link-in.plan", "ok.plan"),
    ("{models}/ok.plan", "ok.plan"),
])
def test_paths_inside_model_dirs_resolve(dirs, path, resolves_to):
    models, _ = dirs
    assert resolve_model_path(path.format(models=models), [str(models)]) == (models / resolves_to).resolve()


@pytest.mark.parametrize("path, message", [
    ("../outside/secret.plan", "not a file inside the model_dirs"),
    ("sub/../../outside/secret.plan", "not a file inside the model_dirs"),
    ("{outside}/secret.plan", "not a file inside the model_dirs"),
    ("/etc/passwd", "not a file inside the model_dirs"),
    ("link-out.plan", "not a file inside the model_dirs"),
    ("dir-out/secret.plan", "not a file inside the model_dirs"),
    ("ok.plan\x00.txt", "NUL byte"),
    ("\x00", "NUL byte"),
    ("loop-a", "cannot be resolved"),
    ("x" * 5000, "cannot be resolved"),
    ("", "not a file inside the model_dirs"),
    (".", "not a file inside the model_dirs"),
    ("sub", "not a file inside the model_dirs"),
    ("missing.plan", "not a file inside the model_dirs"),
    ("~/.bashrc", "not a file inside the model_dirs"),
])
def test_paths_cannot_escape_model_dirs(dirs, path, message):
    models, outside = dirs
    with pytest.raises(ConfigError, match=message):
        resolve_model_path(path.format(models=models, outside=outside), [str(models)])


@pytest.mark.parametrize("name", ["../etc", "a/b", "/abs", ".hidden", "x\x00y", "", "a" * 65, "white space"])
def test_model_names_cannot_be_paths(name):
    # Names become deployment names and URL path segments; the pattern keeps them plain.
    with pytest.raises(ValueError, match="name"):
        ModelConfig.model_validate({"name": name, "source": {"architecture": "resnet18"}})


# -- nothing on the request path unpickles client data -------------------------------------------

#: Modules a request passes through, HTTP and handle: ingress, protocol, the replica,
#: the input checks and the engine's call path (backends included).
REQUEST_PATH = [
    "deployments/ingress.py", "deployments/protocol/request.py", "deployments/protocol/response.py",
    "deployments/protocol/status.py", "deployments/protocol/_json.py", "deployments/grpc_service.py",
    "deployments/parse_worker.py", "deployments/body_intake.py", "deployments/shared_body.py",
    "deployments/model.py", "deployments/group.py", "deployments/replica.py",
    "engine_runtime/spec.py",
    "engine_runtime/engine.py", "engine_runtime/memory/admission.py", "engine_runtime/memory/budget.py",
    "engine_runtime/memory/_shm.py", "engine_runtime/backends/pytorch.py",
    "engine_runtime/backends/_pytorch_graphs.py",
    "engine_runtime/backends/tensorrt.py",
]
#: Calls that run code from data: never on the request path, anywhere in Ebb only where listed.
_CODE_FROM_DATA = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "<expr>")  # module.eval() is not eval()
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            try:
                return ast.literal_eval(kw.value)
            except ValueError:
                return "<expr>"
    return None


def unsafe_calls(path: Path) -> list[str]:
    """Calls in ``path`` that could run code carried by data."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] in _CODE_FROM_DATA for n in names):
                found.append(f"{path.name}:{node.lineno} imports {names}")
    for call in _calls(tree):
        name = _dotted(call.func)
        line = f"{path.name}:{call.lineno} {name}"
        if name in ("eval", "exec", "compile", "__import__") or name.split(".")[0] in _CODE_FROM_DATA:
            found.append(line)
        elif name == "torch.load" and _kw(call, "weights_only") is not True:
            found.append(f"{line} without weights_only=True")
        elif name.endswith(("np.load", "numpy.load")) and _kw(call, "allow_pickle") not in (None, False):
            found.append(f"{line} with allow_pickle")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(line)
    return found


@pytest.mark.parametrize("module", REQUEST_PATH)
def test_request_path_never_unpickles_or_evaluates(module):
    assert unsafe_calls(REPO / module) == []


def test_nothing_in_ebb_loads_code_from_data():
    """Beyond the request path too (weights, plans, config): torch.load only with
    weights_only=True, numpy without pickles, YAML safely, no eval."""
    found = []
    for package in ("deployments", "engine_runtime"):
        for path in sorted((REPO / package).rglob("*.py")):
            found += unsafe_calls(path)
    assert found == []


def test_the_checker_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, numpy as np, yaml\n"
                   "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
                   "yaml.load(s)\neval(s)\npickle.loads(b)\n")
    found = unsafe_calls(bad)
    assert len(found) == 7, found
    good = tmp_path / "good.py"
    good.write_text("import torch, numpy as np, yaml, json\ntorch.load(f, weights_only=True)\nnp.load(f)\n"
                    "yaml.safe_load(s)\njson.loads(s)\n")
    assert unsafe_calls(good) == []
