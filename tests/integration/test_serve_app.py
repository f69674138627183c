"""Ebb's Serve application end to end: real Ray, real Serve, logical GPUs, the CPU.

One cluster and one application for the whole module (``ebb`` below): a ResNet-18
at 32x32 (pinned static, so it holds context memory between calls) and a BERT-tiny
(pinned dynamic, so each call takes its context memory through the GPU's shared
admission budget), each a replica at a quarter of one logical GPU. Tests that
change the application (the 503, reconfigure, shutdown) come last and put back
what they changed.
"""

from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from serve_harness import (
    APP_NAME,
    ServeApp,
    application,
    idle,
    model_deployment_options,
    replica_differences,
    small_args,
    view_summary,
    wait_for,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE = (3, 32, 32)
SEQ_LEN = 16
RESNET_STATIC = {"mode": "static", "pin": "static", "max_batch_size": 4, "batch_wait_timeout_s": 0.05}
# Outputs of one sample must not depend on what it was batched with; fp32 convolutions
# on the CPU may sum in another order for another batch size.
RTOL, ATOL = 1e-4, 1e-5


@dataclass
class Ebb:
    serve: ServeApp
    args: dict[str, Any]
    resnet_user_config: dict[str, Any]

    @property
    def url(self) -> str:
        return self.serve.url

    def main_application(self) -> dict[str, Any]:
        return application(self.args, deployments={
            "resnet18": model_deployment_options(self.resnet_user_config),
            "encoder": model_deployment_options(),
        })

    def handle(self, model: str):
        from ray import serve

        return serve.get_deployment_handle(model, app_name=APP_NAME)

    def status(self, model: str) -> dict[str, Any]:
        return self.handle(model).status.remote().result(timeout_s=30)

    def infer(self, model: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.handle(model).infer.remote(inputs).result(timeout_s=60)


@pytest.fixture(scope="module")
def ebb(serve_instance: ServeApp) -> Ebb:
    app = Ebb(serve_instance, small_args(), dict(RESNET_STATIC))
    app.serve.deploy([app.main_application()], timeout_s=300)
    app.serve.wait_ready()
    return app


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *IMAGE), dtype=np.float32)


def token_ids(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=(batch, SEQ_LEN), dtype=np.int64)


def json_body(x: np.ndarray, name: str = "input", datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
            **extra}


def binary_body(x: np.ndarray, name: str = "input", datatype: str = "FP32",
                binary_output: bool = True) -> tuple[bytes, dict[str, str]]:
    """A request in Triton's binary tensor data extension: a JSON header, then raw bytes."""
    raw = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
    header = json.dumps({
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": binary_output},
    }).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def decode_binary_response(resp: requests.Response) -> dict[str, np.ndarray]:
    header_len = int(resp.headers[HEADER_LENGTH])
    header = json.loads(resp.content[:header_len])
    out, offset = {}, header_len
    for t in header["outputs"]:
        size = t["parameters"]["binary_data_size"]
        dtype = np.dtype({"FP32": "float32", "INT64": "int64"}[t["datatype"]]).newbyteorder("<")
        out[t["name"]] = np.frombuffer(resp.content[offset:offset + size], dtype=dtype).reshape(t["shape"])
        offset += size
    assert offset == len(resp.content)
    return out


def error_of(resp: requests.Response) -> str:
    return resp.json()["error"]


# -- health, metadata --------------------------------------------------------------


def test_health_and_metadata(ebb: Ebb):
    assert requests.get(f"{ebb.url}/v2/health/live", timeout=10).status_code == 200
    assert requests.get(f"{ebb.url}/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(f"{ebb.url}/v2", timeout=10).json()["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"]
    for model in ("resnet18", "encoder"):
        assert requests.get(f"{ebb.url}/v2/models/{model}/ready", timeout=10).status_code == 200
    meta = requests.get(f"{ebb.url}/v2/models/resnet18", timeout=10).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *IMAGE]}]
    assert meta["outputs"][0]["datatype"] == "FP32"
    meta = requests.get(f"{ebb.url}/v2/models/encoder/versions/1", timeout=10).json()
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, SEQ_LEN]}]


def test_replicas_sit_on_a_quarter_of_one_logical_gpu(ebb: Ebb):
    resnet, encoder = ebb.status("resnet18"), ebb.status("encoder")
    assert resnet["virtual_gpu"] and resnet["gpu"].startswith("vgpu-")
    assert resnet["gpu"] == encoder["gpu"], "both replicas share the one logical GPU"
    assert (resnet["mode"], encoder["mode"]) == ("static", "dynamic")
    # On the CPU the engine only accounts for context memory (no device to hold it on).
    assert resnet["mechanism"] == encoder["mechanism"] == "host-accounting"


# -- HTTP ------------------------------------------------------------------------------


def test_http_json_matches_handle(ebb: Ebb):
    x = images(2, seed=1)
    resp = requests.post(f"{ebb.url}/v2/models/resnet18/infer", json=json_body(x, id="req-1"), timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_name"] == "resnet18" and body["id"] == "req-1"
    (out,) = body["outputs"]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    expected = ebb.infer("resnet18", {"input": x})[out["name"]]
    assert got.shape == expected.shape == (2, out["shape"][1])
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_http_binary_matches_handle(ebb: Ebb):
    ids = token_ids(3, seed=2)
    body, headers = binary_body(ids, name="input_ids", datatype="INT64")
    resp = requests.post(f"{ebb.url}/v2/models/encoder/infer", data=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/octet-stream"
    got = decode_binary_response(resp)
    expected = ebb.infer("encoder", {"input_ids": ids})
    assert set(got) == set(expected)
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=ATOL)


def test_tritonclient_against_the_app(ebb: Ebb):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{ebb.serve.http_port}", network_timeout=60.0)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("resnet18")
        meta = client.get_model_metadata("resnet18")
        assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["shape"] == [-1, *IMAGE]
        output_name = meta["outputs"][0]["name"]
        x = images(2, seed=3)
        expected = ebb.infer("resnet18", {"input": x})[output_name]
        for binary in (True, False):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("resnet18", [inp],
                                  outputs=[httpclient.InferRequestedOutput(output_name, binary_data=binary)])
            np.testing.assert_allclose(result.as_numpy(output_name), expected, rtol=RTOL, atol=ATOL)
    finally:
        client.close()


# -- handles -----------------------------------------------------------------------------


def test_handle_numpy_in_numpy_out_and_torch_accepted(ebb: Ebb):
    import torch

    x = images(3, seed=4)
    from_numpy = ebb.infer("resnet18", {"input": x})
    from_torch = ebb.infer("resnet18", {"input": torch.from_numpy(x)})
    assert set(from_numpy) == set(from_torch)
    for name, value in from_numpy.items():
        assert isinstance(value, np.ndarray) and isinstance(from_torch[name], np.ndarray)
        assert value.shape[0] == 3
        np.testing.assert_allclose(from_torch[name], value, rtol=RTOL, atol=ATOL)


def test_handle_refuses_bad_input_with_its_class(ebb: Ebb):
    from engine_runtime.errors import BatchTooLargeError, UnknownInputError

    with pytest.raises(UnknownInputError, match="'inp'"):
        ebb.infer("resnet18", {"inp": images(1, seed=0)})
    with pytest.raises(BatchTooLargeError):
        ebb.infer("resnet18", {"input": images(5, seed=0)})


# -- batching ----------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_answered_individually(ebb: Ebb):
    sizes = [1, 3, 1, 2, 1, 1, 3, 1, 1, 2, 1, 1]
    inputs = [images(b, seed=100 + i) for i, b in enumerate(sizes)]
    # References one at a time, so no two requests share an engine call.
    expected = [ebb.infer("resnet18", {"input": x}) for x in inputs]
    calls_before = ebb.status("resnet18")["stats"]["calls_ok"]

    handle = ebb.handle("resnet18")
    responses = [handle.infer.remote({"input": x}) for x in inputs]
    results = [r.result(timeout_s=120) for r in responses]
    for x, got, want in zip(inputs, results, expected):
        for name in want:
            assert got[name].shape[0] == x.shape[0]
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL)

    stats = ebb.status("resnet18")["stats"]
    engine_calls = stats["calls_ok"] - calls_before
    # Merged: fewer engine calls than requests. Never past the profile's max batch of 4:
    # the engine refuses such a batch, which would have failed a request above.
    assert engine_calls < len(sizes), f"{len(sizes)} requests took {engine_calls} engine calls"
    assert engine_calls >= -(-sum(sizes) // 4)
    assert stats["calls_invalid"] == 0 or stats["calls_failed"] == 0

    # The same over HTTP, concurrently.
    def post(x: np.ndarray) -> np.ndarray:
        resp = requests.post(f"{ebb.url}/v2/models/resnet18/infer", json=json_body(x), timeout=120)
        assert resp.status_code == 200, resp.text
        (out,) = resp.json()["outputs"]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    with ThreadPoolExecutor(max_workers=6) as pool:
        http_results = list(pool.map(post, inputs[:6]))
    for got, want in zip(http_results, expected[:6]):
        np.testing.assert_allclose(got, next(iter(want.values())), rtol=RTOL, atol=ATOL)


# -- client mistakes -----------------------------------------------------------------------


def _mistakes() -> list[tuple[str, str, dict[str, Any], int, str]]:
    """(case id, model, request kwargs, status, text the message must contain)."""
    x = images(1, seed=0)
    good = json_body(x)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    lying_body, lying_headers = binary_body(x)
    short_tail_body, short_tail_headers = binary_body(x)
    return [
        ("unknown-model", "nope", {"json": good}, 404, "'nope'"),
        ("unknown-input", "resnet18", {"json": json_body(x, name="pixels")}, 400, "'pixels'"),
        ("wrong-datatype", "resnet18", {"json": json_body(x.astype(np.float64), datatype="FP64")}, 400, "FP32"),
        ("wrong-shape", "resnet18", {"json": json_body(images(1, seed=0)[:, :, :16, :16])}, 400, "input"),
        ("wrong-rank", "resnet18", {"json": json_body(x[0])}, 400, "rank"),
        ("batch-over-max", "resnet18", {"json": json_body(images(5, seed=0))}, 400, "4"),
        ("data-length-disagrees", "resnet18",
         {"json": {"inputs": [{"name": "input", "shape": [1, *IMAGE], "datatype": "FP32", "data": [0.5] * 10}]}},
         400, "elements"),
        ("non-finite", "resnet18", {"data": json.dumps(json_body(nan)),
                                    "headers": {"Content-Type": "application/json"}}, 400, "input"),
        ("malformed-json", "resnet18", {"data": b'{"inputs": [', "headers": {"Content-Type": "application/json"}},
         400, "malformed JSON"),
        ("oversized-body", "resnet18", {"data": b" " * ((1 << 20) + 1),
                                        "headers": {"Content-Type": "application/json"}}, 413, "limit"),
        ("wrong-content-type", "resnet18", {"data": json.dumps(good), "headers": {"Content-Type": "text/plain"}},
         415, "text/plain"),
        ("binary-header-longer-than-body", "resnet18",
         {"data": lying_body, "headers": {**lying_headers, HEADER_LENGTH: str(len(lying_body) + 10)}},
         400, HEADER_LENGTH),
        ("binary-tail-shorter-than-declared", "resnet18",
         {"data": short_tail_body[:-8], "headers": short_tail_headers}, 400, "binary_data_size"),
    ]


MISTAKES = _mistakes()


@pytest.mark.parametrize("model,kwargs,status,text", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_client_mistake_gets_its_4xx(ebb: Ebb, model: str, kwargs: dict, status: int, text: str):
    resp = requests.post(f"{ebb.url}/v2/models/{model}/infer", timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    assert text in error_of(resp), error_of(resp)


def test_replicas_healthy_after_mistakes(ebb: Ebb):
    before = {m: ebb.status(m) for m in ("resnet18", "encoder")}
    for _, model, kwargs, _, _ in MISTAKES:
        requests.post(f"{ebb.url}/v2/models/{model}/infer", timeout=60, **kwargs)
    assert requests.get(f"{ebb.url}/v2/health/ready", timeout=10).status_code == 200
    resp = requests.post(f"{ebb.url}/v2/models/resnet18/infer", json=json_body(images(1, seed=9)), timeout=60)
    assert resp.status_code == 200, resp.text
    for model, old in before.items():
        new = ebb.status(model)
        assert (new["replica_id"], new["pid"]) == (old["replica_id"], old["pid"]), "no replica restarted"
        assert new["stats"]["calls_failed"] == old["stats"]["calls_failed"], "no mistake became an internal failure"


# -- 503 when context memory cannot be had in time -------------------------------------------


def test_503_with_retry_after_when_no_context_memory(ebb: Ebb):
    """Another process fills the encoder's GPU: the coordinator sets the GPU's shared
    admission budget to 0, and a dynamic call is refused with 503 and Retry-After.

    The budget is not written directly: the coordinator rewrites it from its view on
    every report. Instead the coordinator is told that something outside Ebb holds
    the whole (logical) GPU, which is what makes it set a budget of 0 on a real card.
    """
    import ray

    from deployments.coordinator import get_existing
    from engine_runtime.memory.admission import SharedBudget

    gpu = ebb.status("encoder")["gpu"]
    view = wait_for(lambda: next((g for g in requests.get(f"{ebb.url}/ebb/status", timeout=10).json()["gpus"]
                                  if g["gpu"] == gpu), None), 30, f"{gpu} in /ebb/status")
    coordinator = get_existing(ebb.args["coordinator"].get("namespace", "ebb"))
    budget = SharedBudget(key=gpu)
    ids = token_ids(1, seed=5)
    try:
        ray.get(coordinator.inject_external_bytes.remote(gpu, view["total_bytes"]))
        wait_for(lambda: budget.snapshot().capacity_bytes == 0, 30, f"the budget of {gpu} to reach 0")
        resp = requests.post(f"{ebb.url}/v2/models/encoder/infer", json=json_body(ids, "input_ids", "INT64"),
                             timeout=60)
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert "memory" in error_of(resp).lower() or "bytes" in error_of(resp)
        assert ebb.status("encoder")["stats"]["calls_unavailable"] >= 1
    finally:
        ray.get(coordinator.inject_external_bytes.remote(gpu, 0))
        wait_for(lambda: (budget.snapshot().capacity_bytes or 0) > 0, 30, f"the budget of {gpu} to come back")
        budget.close()
    resp = requests.post(f"{ebb.url}/v2/models/encoder/infer", json=json_body(ids, "input_ids", "INT64"), timeout=60)
    assert resp.status_code == 200, resp.text


# -- reconfigure -----------------------------------------------------------------------------


def test_reconfigure_changes_mode_and_batching_without_restart(ebb: Ebb):
    before = ebb.status("resnet18")
    assert before["mode"] == "static" and before["batching"]["max_batch_size"] == 4
    assert before["stats"]["context_bytes_held"] > 0, "static mode holds its context memory between calls"

    ebb.resnet_user_config = {"mode": "dynamic", "pin": "dynamic", "max_batch_size": 2,
                              "batch_wait_timeout_s": 0.001}
    ebb.serve.deploy([ebb.main_application()])
    after = wait_for(lambda: (s := ebb.status("resnet18"))["mode"] == "dynamic"
                     and s["batching"]["max_batch_size"] == 2 and s, 60, "resnet18 to be reconfigured")
    assert (after["replica_id"], after["pid"]) == (before["replica_id"], before["pid"]), "replica restarted"
    assert after["pin"] == "dynamic" and after["batching"]["batch_wait_timeout_s"] == 0.001
    assert after["stats"]["context_bytes_held"] == 0, "leaving static mode gave its context memory back"
    x = images(3, seed=6)
    assert next(iter(ebb.infer("resnet18", {"input": x}).values())).shape[0] == 3
    assert ebb.status("resnet18")["stats"]["context_bytes_held"] == 0, "a dynamic call gives back what it took"


# -- shutdown ----------------------------------------------------------------------------------


def replica_log(replica_id: str) -> Path:
    """The Serve log file of a replica of this module's cluster."""
    import ray

    # No public API names the session's log folder.
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    (path,) = logs.glob(f"replica_*_{replica_id}.log")
    return path


def _gpu_view(ebb: Ebb, gpu: str) -> dict[str, Any]:
    return next(g for g in requests.get(f"{ebb.url}/ebb/status", timeout=10).json()["gpus"] if g["gpu"] == gpu)


def test_shutdown_gives_memory_back_to_baseline(ebb: Ebb):
    """A second application's replica holds static context memory; deleting the
    application must leave nothing behind.

    Measurable on the CPU: the replica's own accounting before it goes and after its
    engine closed (logged by its ``__del__``, which Serve's graceful shutdown calls),
    its process exiting, the coordinator's per-GPU figure back at its baseline, and no
    bytes left on the GPU's shared admission budget. Not measurable here: device
    memory, since there is none; on the CPU the engine only accounts for context
    bytes, so "0 bytes held" is the engine's bookkeeping, not a driver's reading.
    """
    from engine_runtime.memory.admission import SharedBudget

    gpu = ebb.status("encoder")["gpu"]
    before = wait_for(lambda: idle(_gpu_view(ebb, gpu)), 30, "the GPU view, no call in flight")
    baseline = before["used_bytes"]

    args = copy.deepcopy(ebb.args)
    args["models"] = [dict(args["models"][0], name="doomed")]
    gone = application(args, name="gone", route_prefix="/gone",
                       deployments={"doomed": model_deployment_options({"mode": "static", "pin": "static"})})
    ebb.serve.deploy([ebb.main_application(), gone])
    ebb.serve.wait_ready(prefix="/gone")
    from ray import serve

    doomed = serve.get_deployment_handle("doomed", app_name="gone")
    assert next(iter(doomed.infer.remote({"input": images(2, seed=7)}).result(timeout_s=60).values())).shape[0] == 2
    st = doomed.status.remote().result(timeout_s=30)
    assert st["gpu"] == gpu and st["mode"] == "static"
    held = st["stats"]["context_bytes_held"]
    assert held > 0
    wait_for(lambda: _gpu_view(ebb, gpu)["used_bytes"] >= baseline + held, 30,
             "the coordinator to count the new replica")

    ebb.serve.deploy([ebb.main_application()])  # the "gone" application is deleted
    wait_for(lambda: ebb.serve.app_status("gone") == "ABSENT", 60, "the application to be deleted")

    def exited() -> bool:
        try:
            os.kill(st["pid"], 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(exited, 60, f"replica process {st['pid']} to exit")
    # Serve's graceful shutdown ran the replica's __del__, which closed the engine and
    # logged what its accounting still held, into the replica's own log file.
    log_path = replica_log(st["replica_id"])
    closed = wait_for(lambda: [ln for ln in log_path.read_text().splitlines() if "shut down: engine closed" in ln],
                      30, f"the shutdown line in {log_path}")
    assert "(0 bytes) of context memory still held" in closed[0], closed
    def back() -> dict[str, Any]:
        v = _gpu_view(ebb, gpu)
        assert st["replica_id"] not in {r["replica_id"] for r in v["replicas"]}, view_summary(v)
        # Exactly the baseline where the replicas that stayed are the same ones in the same
        # modes; one Serve restarted or the coordinator moved meanwhile changes the figure
        # for reasons of its own.
        diffs = replica_differences(before, v, {})
        assert idle(v), f"a call in flight: {view_summary(v)}"
        if not diffs:
            assert v["used_bytes"] == baseline, f"before: {view_summary(before)}; now: {view_summary(v)}"
        else:
            print(f"replicas differ from the baseline ({diffs}): used bytes not compared exactly")
        return v

    view = wait_for(back, 30, f"used bytes of {gpu} back to the baseline {baseline}")
    assert st["replica_id"] not in {r["replica_id"] for r in view["replicas"]}
    budget = SharedBudget(key=gpu)
    try:
        snap = budget.snapshot()
    finally:
        budget.close()
    assert st["pid"] not in snap.holders and snap.used_bytes == 0
    # The application that stayed was not disturbed.
    assert requests.get(f"{ebb.url}/v2/health/ready", timeout=10).status_code == 200
