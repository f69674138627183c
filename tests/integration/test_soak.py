"""Sustained load while modes switch: nothing lost, nothing answered twice, memory back.

The driver is ``scripts/soak.py`` (:class:`soak.Soak`), run here on this module's
cluster: three HTTP and three handle threads call a ResNet-18 and a BERT-tiny, both
``pin: auto``, while the logical GPU's pressure flips every 3 s so the coordinator
moves them between static and dynamic. The short form always runs (about 40 s of
traffic); the long form is marked ``slow`` (``EBB_SOAK_DURATION_S``, default 600 s),
and ``python scripts/soak.py --duration-s N`` runs the same on its own cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from serve_harness import APP_NAME, ServeApp, application, model_deployment_options, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import soak  # noqa: E402

SERVE_HTTP_PORTS = range(18466, 18497)
SHORT_DURATION_S = 40.0
#: Generous on two shared CPU cores: a call may wait for a batch, a mode switch and its
#: admission deadline (2 s in the soak's args) in turn.
P99_BOUND_S = 10.0


@pytest.fixture(scope="module")
def driver(serve_instance: ServeApp):
    from ray import serve

    from deployments.coordinator import get_existing

    args = soak.soak_args()
    serve_instance.deploy([application(args, deployments={m["name"]: model_deployment_options()
                                                          for m in args["models"]})], timeout_s=300)
    serve_instance.wait_ready()
    handles = {m["name"]: serve.get_deployment_handle(m["name"], app_name=APP_NAME) for m in args["models"]}
    gpu = handles["resnet18"].status.remote().result(timeout_s=60)["gpu"]
    coordinator = wait_for(get_existing, 30, "the coordinator")

    def make(**kwargs) -> soak.Soak:
        return soak.Soak(serve_instance.url, handles, coordinator, gpu,
                         virtual_gpu_bytes=args["coordinator"]["virtual_gpu_memory_bytes"], **kwargs)

    return make


def check(report: dict) -> None:
    print("\n" + soak.table(report))
    assert not report["hung_threads"], report["hung_threads"]
    assert report["sent"] == report["answered"] and not report["lost"], report["lost"][:10]
    assert not report["answered_twice"], report["answered_twice"][:10]
    assert not report["undocumented"], report["undocumented"]
    assert report["by_outcome"].get("ok", 0) >= 0.9 * report["sent"], report["by_outcome"]
    assert report["mode_switches"] >= 4, "the modes did not switch"
    for channel, lat in report["latency"].items():
        assert lat["p99_s"] < P99_BOUND_S, (channel, lat)
    mem = report["memory"]
    assert all(b == 0 for b in mem["all_dynamic_after"]["held_bytes"].values()), mem["all_dynamic_after"]
    assert mem["after"]["coordinator_used_bytes"] == mem["baseline"]["coordinator_used_bytes"]
    assert mem["after"]["held_bytes"] == mem["baseline"]["held_bytes"]
    assert mem["after"]["budget_used_bytes"] == 0 and not mem["after"]["budget_holders"]
    assert not any(report["restarts"].values()), report["restarts"]


def test_soak_short(driver):
    check(driver().run(SHORT_DURATION_S))


@pytest.mark.slow
def test_soak_long(driver):
    check(driver().run(float(os.environ.get("EBB_SOAK_DURATION_S", "600"))))
