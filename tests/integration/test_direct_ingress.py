"""``cluster.yaml`` under Ray Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``):
the ingress replica also serves HTTP and gRPC on ports of its own, which Serve allocates
from the ``RAY_SERVE_DIRECT_INGRESS_MIN_*_PORT`` ranges; clients there skip the proxy,
which still runs on the head node.

Why it is tested: docs/serving.md offers it for latency (the proxy hop was the largest
piece of a call on the CPU machine, docs/benchmarks.md §12), and Ebb's gRPC service must
then be served by the ingress replica itself. One ingress replica (Serve's load balancer
for several is HAProxy). ``resnet18`` is embedded in it (``args.embed``, the zero-hop
path docs/serving.md recommends with direct ingress); ``encoder`` keeps its deployment,
reached through a handle: both paths answer on the replica's own ports. Same cluster handling as test_serve_cli.py: ``ray start`` and
``serve run`` in subprocesses, cleaned up by process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from serve_harness import free_port, wait_for
from test_serve_cli import BIN, REPO, _processes_under, _stop_processes

#: Where Serve allocates the ingress replica's ports (the range's first free port).
HTTP_PORTS = range(18600, 18616)
GRPC_PORTS = range(19600, 19616)


@pytest.fixture(scope="module")
def direct() -> dict[str, str]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ebb-ray-di-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(HTTP_PORTS.start),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(HTTP_PORTS.stop),
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(GRPC_PORTS.start),
                "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(GRPC_PORTS.stop)})
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    (app,) = config["applications"]
    for model in app["args"]["models"]:
        if "image_size" in model["input"]:
            model["input"]["image_size"] = 32
    app["args"]["embed"] = "resnet18"
    resnet = next(d for d in app["deployments"] if d["name"] == "resnet18")
    app["deployments"].remove(resnet)
    for d in app["deployments"]:
        if d["name"] == "EbbIngress":
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
            # The embedded model's share of the GPU and its user_config are the ingress's now.
            d["ray_actor_options"] = resnet["ray_actor_options"]
            d["user_config"] = resnet["user_config"]
    config_path = temp_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    process = None
    try:
        port = free_port()
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-gpus=1", "--num-cpus=4",
             "--disable-usage-stats", "--include-dashboard=false", f"--temp-dir={temp_dir}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
            env=env, cwd=temp_dir, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        log_path = temp_dir / "serve-run.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([str(BIN / "serve"), "run", f"--address=127.0.0.1:{port}", str(config_path)],
                                       env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

        def http_port() -> int | None:
            if process.poll() is not None:
                raise AssertionError(f"serve run exited:\n{log_path.read_text()[-4000:]}")
            for p in HTTP_PORTS:
                try:
                    if requests.get(f"http://127.0.0.1:{p}/v2/health/ready", timeout=2).status_code == 200:
                        return p
                except requests.RequestException:
                    pass
            return None

        try:
            found = wait_for(http_port, 300, "the ingress replica's own HTTP port to answer ready", interval_s=0.5)
        except (TimeoutError, AssertionError) as err:
            raise AssertionError(f"{err}\n--- serve run log ---\n{log_path.read_text()[-4000:]}") from None
        yield {"url": f"http://127.0.0.1:{found}", "grpc_ports": GRPC_PORTS}
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        _stop_processes(_processes_under(str(temp_dir)))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _grpc_client(direct):
    import tritonclient.grpc as grpcclient

    def grpc_client():
        for p in direct["grpc_ports"]:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{p}")
            try:
                if client.is_server_live(client_timeout=2):
                    return client
            except Exception:  # noqa: BLE001 - nothing on this port
                pass
        return None

    return wait_for(grpc_client, 60, "the ingress replica's own gRPC port")


def _http_and_grpc(direct, model: str, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tritonclient.grpc as grpcclient

    datatype = "FP32" if x.dtype == np.float32 else "INT64"
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}
    resp = requests.post(f"{direct['url']}/v2/models/{model}/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    http_out = np.asarray(resp.json()["outputs"][0]["data"], dtype=np.float32)
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return http_out, _grpc_client(direct).infer(model, [inp]).as_numpy("output").ravel()


def test_http_and_grpc_answer_alike_from_the_ingress_replica_itself(direct):
    """The embedded model: no process boundary between the replica's port and its engine."""
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    http_out, grpc_out = _http_and_grpc(direct, "resnet18", "input", x)
    np.testing.assert_allclose(grpc_out, http_out, rtol=1e-6, atol=1e-6)
    # A mistake is still the client's, with the same mapping as behind the proxy.
    bad = requests.post(f"{direct['url']}/v2/models/resnet18/infer", json={"inputs": []}, timeout=30)
    assert bad.status_code == 400, bad.text


def test_a_model_with_its_own_deployment_answers_there_too(direct):
    """``encoder`` is not embedded: the ingress replica reaches it through its handle."""
    ids = np.random.default_rng(1).integers(0, 1000, (2, 128), dtype=np.int64)
    http_out, grpc_out = _http_and_grpc(direct, "encoder", "input_ids", ids)
    np.testing.assert_allclose(grpc_out, http_out, rtol=1e-6, atol=1e-6)
    assert requests.get(f"{direct['url']}/v2/models/encoder/ready", timeout=30).status_code == 200
