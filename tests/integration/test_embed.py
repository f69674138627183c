"""``args.embed``: a model group running inside the ingress replica, end to end on real
Ray and Serve (one logical GPU, the CPU).

Why: each hop between Serve processes cost a ResNet-sized request milliseconds
(docs/benchmarks.md §12); with ``embed`` the ingress replica builds the group's replica
object itself and calls it in-process (``deployments.local_handle``). What must hold:
the embedded models answer as the engine built alone does, one model of the group is
not another, the ungrouped model keeps its deployment and its handle path, mistakes keep
their statuses, the group has no Serve deployment of its own (so Serve's options for it
belong to EbbIngress, whose ``user_config`` reaches the group), and the coordinator sees
the embedded replica as it sees any other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import requests

from serve_harness import APP_NAME, ServeApp, application, model_deployment_options, wait_for

GROUP = "zoo"
MODELS = {"resnet-a": 0, "resnet-b": 1}
RTOL, ATOL = 1e-4, 1e-5


def embed_args() -> dict[str, Any]:
    def resnet(name: str, seed: int) -> dict[str, Any]:
        return {"name": name, "group": GROUP, "source": {"architecture": "resnet18", "seed": seed},
                "input": {"min_batch": 1, "opt_batch": 2, "max_batch": 2, "image_size": 32}, "backend": "pytorch",
                "lazy": False}

    return {
        "model_dirs": ["."],
        "http": {"max_body_bytes": 1 << 20, "retry_after_s": 2},
        "coordinator": {"poll_interval_s": 0.2, "min_dwell_s": 0.0, "admission_deadline_s": 5.0,
                        "virtual_gpu_memory_bytes": 2 << 30},
        "groups": [{"name": GROUP, "mode": "dynamic", "batching": {"max_batch_size": 2,
                                                                     "batch_wait_timeout_s": 0.005}}],
        "models": [resnet(n, s) for n, s in MODELS.items()] + [
            {"name": "solo", "source": {"architecture": "bert-tiny", "seed": 0},
             "input": {"min_batch": 1, "opt_batch": 2, "max_batch": 2, "seq_len": 16}, "backend": "pytorch",
             "lazy": False}],
        "embed": GROUP,
    }


def embed_application(ingress_user_config: dict | None = None) -> dict[str, Any]:
    app = application(embed_args(), deployments={"solo": model_deployment_options()})
    ingress = next(d for d in app["deployments"] if d["name"] == "EbbIngress")
    # The group's GPU share is the ingress's now.
    ingress["ray_actor_options"] = {"num_gpus": 0.25, "num_cpus": 0.25}
    if ingress_user_config is not None:
        ingress["user_config"] = ingress_user_config
    return app


@pytest.fixture(scope="module")
def embedded(serve_instance: ServeApp) -> ServeApp:
    serve_instance.deploy([embed_application({"pin": "static"})], timeout_s=300)
    serve_instance.wait_ready(timeout_s=120)
    return serve_instance


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((2, 3, 32, 32), dtype=np.float32)


def http_infer(app: ServeApp, model: str, x: np.ndarray, name: str = "input") -> requests.Response:
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32" if x.dtype == np.float32
                        else "INT64", "data": x.ravel().tolist()}]}
    return requests.post(f"{app.url}/v2/models/{model}/infer", json=body, timeout=120)


def reference(model: str, x: np.ndarray) -> np.ndarray:
    """The model's engine built alone, in this process, from the same config."""
    from deployments.config import parse_app_config
    from deployments.engine_factory import make_engine

    cfg = parse_app_config(embed_args())
    engine = make_engine(next(m for m in cfg.models if m.name == model), cfg)
    try:
        return next(iter(engine.infer({"input": x}).values()))
    finally:
        engine.close()


def test_embedded_models_answer_as_their_engine_alone_and_unlike_each_other(embedded: ServeApp):
    x = image(3)
    answers = {}
    for model in MODELS:
        resp = http_infer(embedded, model, x)
        assert resp.status_code == 200, resp.text
        out = resp.json()["outputs"][0]
        answers[model] = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_allclose(answers[model], reference(model, x), rtol=RTOL, atol=ATOL)
    assert not np.allclose(answers["resnet-a"], answers["resnet-b"], atol=1e-3)


def test_the_ungrouped_model_keeps_its_own_deployment_and_the_group_has_none(embedded: ServeApp):
    from ray import serve

    deployments = set(serve.status().applications[APP_NAME].deployments)
    assert deployments == {"EbbIngress", "solo"}
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 16), dtype=np.int64)
    resp = http_infer(embedded, "solo", ids, name="input_ids")
    assert resp.status_code == 200, resp.text
    handle_out = serve.get_deployment_handle("solo", app_name=APP_NAME).infer.remote(
        {"input_ids": ids}).result(timeout_s=60)
    np.testing.assert_allclose(np.asarray(resp.json()["outputs"][0]["data"], dtype=np.float32),
                               next(iter(handle_out.values())).ravel(), rtol=RTOL, atol=ATOL)


def test_a_python_caller_reaches_embedded_and_own_deployment_models_through_the_ingress_handle(
        embedded: ServeApp):
    from ray import serve

    from deployments.protocol import ModelNotFound

    ingress = serve.get_deployment_handle("EbbIngress", app_name=APP_NAME)
    x = image(7)
    out = ingress.infer_model.remote("resnet-b", {"input": x}).result(timeout_s=60)
    np.testing.assert_allclose(out["output"], reference("resnet-b", x), rtol=RTOL, atol=ATOL)
    ids = np.random.default_rng(2).integers(0, 100, size=(1, 16), dtype=np.int64)
    assert ingress.infer_model.remote("solo", {"input_ids": ids}).result(timeout_s=60)["output"].shape[0] == 1
    with pytest.raises(ModelNotFound, match="unknown model 'resnet-z'; served models are"):
        ingress.infer_model.remote("resnet-z", {"input": x}).result(timeout_s=60)


def test_mistakes_keep_their_statuses(embedded: ServeApp):
    unknown = http_infer(embedded, "resnet-z", image(0))
    assert unknown.status_code == 404 and "resnet-a" in unknown.text
    wrong = http_infer(embedded, "resnet-a", np.zeros((2, 3, 16, 16), dtype=np.float32))
    assert wrong.status_code == 400, wrong.text
    too_many = http_infer(embedded, "resnet-a", image(0).repeat(2, axis=0))
    assert too_many.status_code == 400, too_many.text


def test_the_coordinator_sees_the_embedded_replica_in_the_ingress_process_with_its_user_config(
        embedded: ServeApp):
    from ray import serve
    from ray._private import state  # the GCS's actor table; ray.util.state needs the dashboard

    ingress = serve.get_deployment_handle("EbbIngress", app_name=APP_NAME)
    ingress.timings.remote(True).result(timeout_s=30)
    assert http_infer(embedded, "resnet-b", image(5)).status_code == 200
    # The embedded replica's own call path, read through the ingress (one replica here).
    path = ingress.timings.remote().result(timeout_s=30)
    assert path["engine"]["count"] >= 1 and path["replica"]["count"] >= 1, path

    def group_row():
        view = requests.get(f"{embedded.url}/ebb/status", timeout=30).json()
        rows = [r for g in view["gpus"] for r in g["replicas"] if r.get("group") == GROUP]
        return rows[0] if rows else None

    row = wait_for(group_row, 30, "the embedded group's report to the coordinator")
    assert [m["name"] for m in row["models"]] == list(MODELS)
    (ingress_pid,) = [a["Pid"] for a in state.actors().values()
                      if a["State"] == "ALIVE" and a["ActorClassName"].endswith(":EbbIngress")]
    assert row["pid"] == ingress_pid, (row, ingress_pid)
    # EbbIngress's user_config ({"pin": "static"}) is the group's.
    assert row["pin"] == "static", row


def test_serve_options_for_the_embedded_group_are_refused_with_where_they_belong(serve_instance: ServeApp):
    from deployments.app import bind
    from deployments.config import ConfigError, parse_app_config

    with pytest.raises(ConfigError, match="runs inside EbbIngress"):
        bind(parse_app_config(embed_args()), {GROUP: model_deployment_options()})
