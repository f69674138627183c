"""``cluster.yaml`` through Ray's own CLI: ``ray start``, then ``serve run``, in subprocesses.

The config is the repository's ``cluster.yaml`` with two changes only: a free HTTP
port (another Ray cluster may run on this machine) and a 32-pixel image, so the
replicas build in seconds on two cores. Everything is cleaned up by process id:
``ray stop`` cannot be used, since it stops every Ray process on the machine,
other people's clusters included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from serve_harness import SERVE_HTTP_PORT_RANGE, free_port, wait_for

#: Serve's gRPC port for `serve run`; cluster.yaml's 9000 may be taken by another cluster.
SERVE_GRPC_PORT_RANGE = range(19100, 19200)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class CliCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]


def _processes_under(marker: str) -> list[int]:
    """Ids of this user's processes whose command line names ``marker`` (the cluster's
    own temporary folder, which every process of that cluster is started with)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop_processes(pids: list[int], timeout_s: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def all_gone() -> bool:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return not alive

    try:
        wait_for(all_gone, timeout_s, f"Ray processes {pids} to exit", interval_s=0.2)
    except TimeoutError:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cli_cluster() -> Iterator[CliCluster]:
    """A head node started by ``ray start`` in its own temporary folder."""
    # A short path: Ray's Unix sockets live under it, and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ebb-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Said explicitly: with the mode unset, `ray start` turns token authentication on
    # but a client connecting to it (`serve run --address`) sends no token. Both sides
    # then use the token in ~/.ray/auth_token.
    env["RAY_AUTH_MODE"] = "token"
    try:
        # `ray start` gives its raylet a fixed 30 s to register; on two loaded cores it
        # can miss that, so a failed start is cleaned up and tried once more.
        for _attempt in range(2):
            port = free_port()
            cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}",
                   "--num-gpus=1", "--num-cpus=4", "--disable-usage-stats", "--include-dashboard=false",
                   f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}"]
            started = subprocess.run(cmd, env=env, cwd=temp_dir, capture_output=True, text=True, timeout=180)
            if started.returncode == 0:
                break
            _stop_processes(_processes_under(str(temp_dir)))
        assert started.returncode == 0, f"ray start failed twice:\n{started.stdout}\n{started.stderr}"
        yield CliCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, env=env)
    finally:
        _stop_processes(_processes_under(str(temp_dir)))
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class ServeRun:
    url: str
    grpc_address: str


@pytest.fixture(scope="module")
def serve_run(cli_cluster: CliCluster) -> Iterator[ServeRun]:
    """``serve run`` of the repository's cluster.yaml, HTTP and gRPC ports moved to free ones."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    http_port = free_port(SERVE_HTTP_PORT_RANGE)
    grpc_port = free_port(SERVE_GRPC_PORT_RANGE)
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    (app,) = config["applications"]
    for model in app["args"]["models"]:
        if "image_size" in model["input"]:
            model["input"]["image_size"] = 32
    config_path = cli_cluster.temp_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    log_path = cli_cluster.temp_dir / "serve-run.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "serve"), "run", f"--address={cli_cluster.address}", str(config_path)],
            env=cli_cluster.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve run exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            return requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200

        try:
            wait_for(ready, 300, f"{url}/v2/health/ready to answer 200", interval_s=0.5)
        except (TimeoutError, AssertionError) as err:
            raise AssertionError(f"{err}\n--- serve run log ---\n{log_path.read_text()[-4000:]}") from None
        yield ServeRun(url=url, grpc_address=f"127.0.0.1:{grpc_port}")
    finally:
        # Ctrl-C is how `serve run` is meant to stop: it deletes the application.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _image(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)


def test_serve_run_cluster_yaml_serves_a_request(serve_run: ServeRun):
    x = _image()
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    resp = requests.post(f"{serve_run.url}/v2/models/resnet18/infer", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    (out,) = resp.json()["outputs"]
    assert out["shape"] == [1, 1000] and out["datatype"] == "FP32"
    assert np.isfinite(np.asarray(out["data"], dtype=np.float32)).all()


def _children_named(parents: list[int], name: str) -> list[int]:
    """Ids of the processes whose parent is one of ``parents`` and whose command line
    (a Ray worker's is its title, ``ray::ServeReplica:<app>:<deployment>``) names ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid in parents and name in cmdline:
            found.append(int(entry.name))
    return found


def test_the_ingress_runs_on_serve_s_own_loop_as_cluster_yaml_says(serve_run: ServeRun, cli_cluster: CliCluster):
    """cluster.yaml's runtime_env for EbbIngress reaches its replica's process, where Serve
    reads it at start: without it the ingress pays a thread hop per request each way."""
    from deployments.ingress import SAME_LOOP_ENV

    (key, value), = SAME_LOOP_ENV.items()
    replicas = _children_named(_processes_under(str(cli_cluster.temp_dir)), "ServeReplica:ebb:EbbIngress")
    assert replicas, "no EbbIngress replica process found under this cluster's raylet"
    for pid in replicas:
        environ = dict(item.split("=", 1) for item in
                       (Path("/proc") / str(pid) / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        assert environ.get(key) == value, f"EbbIngress replica {pid}: {key}={environ.get(key)!r}"
    test_serve_run_cluster_yaml_serves_a_request(serve_run)  # and it answers on that loop


def test_grpc_metadata_and_config_through_tritonclient(serve_run: ServeRun):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    client = grpcclient.InferenceServerClient(serve_run.grpc_address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet18")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "ebb" and "model_configuration" in server["extensions"]
    meta = client.get_model_metadata("resnet18", as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
    config = client.get_model_config("resnet18", as_json=True)["config"]
    http_config = httpclient.InferenceServerClient(serve_run.url.removeprefix("http://")).get_model_config("resnet18")
    assert config["max_batch_size"] == http_config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == ["3", "32", "32"] and http_config["input"][0]["dims"] == [3, 32, 32]
    assert config["input"][0]["data_type"] == "TYPE_FP32"


def test_grpc_infer_equals_the_http_answer(serve_run: ServeRun):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = _image(2)
    g_in = grpcclient.InferInput("input", list(x.shape), "FP32")
    g_in.set_data_from_numpy(x)
    got = grpcclient.InferenceServerClient(serve_run.grpc_address).infer("resnet18", [g_in]).as_numpy("output")
    h_in = httpclient.InferInput("input", list(x.shape), "FP32")
    h_in.set_data_from_numpy(x, binary_data=True)
    want = httpclient.InferenceServerClient(serve_run.url.removeprefix("http://")).infer(
        "resnet18", [h_in], outputs=[httpclient.InferRequestedOutput("output", binary_data=True)]).as_numpy("output")
    assert got.shape == (2, 1000) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grpc_errors_carry_the_http_status_as_a_code(serve_run: ServeRun):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(serve_run.grpc_address)

    def code_of(call) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as err:
            call()
        return err.value.status(), err.value.message()

    status, message = code_of(lambda: client.get_model_metadata("nope"))
    assert status == str(grpc.StatusCode.NOT_FOUND) and "nope" in message
    wrong = grpcclient.InferInput("input", [1, 3, 16, 16], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    status, message = code_of(lambda: client.infer("resnet18", [wrong]))
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT) and "'input'" in message, message
    too_big = grpcclient.InferInput("input", [9, 3, 32, 32], "FP32")
    too_big.set_data_from_numpy(_image(9))
    status, message = code_of(lambda: client.infer("resnet18", [too_big]))
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT) and "maximum 8" in message, message
    status, _ = code_of(lambda: client.infer("nope", [too_big]))
    assert status == str(grpc.StatusCode.NOT_FOUND)
    status, message = code_of(lambda: client.load_model("resnet18"))
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT) and "cluster.yaml" in message, message


def test_grpc_repository_index_through_tritonclient(serve_run: ServeRun):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(serve_run.grpc_address)
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: (m["version"], m["state"]) for m in index} == {
        "resnet18": ("1", "READY"), "encoder": ("1", "READY")}
