"""The coordinator with group replicas (``CoordinatorState``, no Ray): under pressure it
orders cold weights paged out, counts them as gone until the replica reports them off
the GPU, drops an order for a model used again, and shows tiers and the floor."""

from __future__ import annotations

from dataclasses import replace

from deployments.config import CoordinatorConfig
from deployments.coordinator import CoordinatorState
from deployments.messages import ModelTierReport, ReplicaReport
from engine_runtime.pressure import GpuPressure

GiB, MiB = 2**30, 2**20
REAL = "GPU-11111111-2222-3333-4444-555555555555"
CFG = CoordinatorConfig(poll_interval_s=0.2, min_dwell_s=1.0)


def reading(used_gib: float) -> GpuPressure:
    total, used = 80 * GiB, int(used_gib * GiB)
    return GpuPressure(uuid=REAL, index=0, total_bytes=total, used_bytes=used, reserved_bytes=0,
                       free_bytes=total - used, utilization_pct=0.0)


def tier(name: str, where: str = "gpu", gib: float = 3.0, idle_s: float = 100.0) -> ModelTierReport:
    return ModelTierReport(name=name, tier=where, weights_bytes=int(gib * GiB), last_used_s=None, idle_s=idle_s,
                           page_ins=0, page_in_seconds_total=0.0, page_outs=0, calls=0)


def group_report(used_gib: float, models: list[ModelTierReport], *, allowed: bool = True,
                 mode: str = "dynamic") -> ReplicaReport:
    resident = sum(m.weights_bytes for m in models if m.tier == "gpu")
    return ReplicaReport(
        replica_id="g1", model="resnets", pid=1000, node_id="node0", gpu=REAL, virtual=False, pin="auto",
        mode=mode, mechanism="vmm-arena", weights_bytes=resident, context_bytes=GiB, held_bytes=0,
        request_rate_per_s=5.0, latency_static_s=None, latency_dynamic_s=None, in_flight=0, loaded=True,
        reading=reading(used_gib), floor_bytes=540 * MiB, group="resnets", models=models,
        page_out_under_pressure=allowed, cold_after_s=30.0)


def test_under_pressure_the_cold_models_are_ordered_out_and_counted_gone_until_done():
    state = CoordinatorState(CFG)
    # 74 GiB: 6 over the 68 GiB target; hot (idle 1 s) stays, the two coldest go.
    models = [tier("hot", idle_s=1.0), tier("c1", idle_s=500.0), tier("c2", idle_s=200.0), tier("c3", idle_s=40.0)]
    d = state.observe(group_report(74, models), 0.0)
    assert d.page_out == ["c1", "c2"] and "paging out cold weights frees 6.00 GiB" in d.page_out_reason
    assert d.mode == "dynamic"
    # Not yet done: the next report (same reading) is answered with the same order and
    # no more models (the 6 GiB ordered count as gone).
    d = state.observe(group_report(74, models), 0.2)
    assert d.page_out == ["c1", "c2"]
    # Done: both on the host; the order is over.
    done = [models[0], replace(models[1], tier="host"), replace(models[2], tier="host"), models[3]]
    d = state.observe(group_report(68, done), 0.4)
    assert d.page_out == [] and d.page_out_reason == ""
    history = state.status(0.4)["history"]
    assert history[-1]["page_out"] == ["c1", "c2"] and history[-1]["new_mode"] is None


def test_a_model_used_again_is_no_longer_ordered_out():
    state = CoordinatorState(CFG)
    models = [tier("c1", idle_s=500.0), tier("c2", idle_s=400.0)]
    assert state.observe(group_report(74, models), 0.0).page_out == ["c1", "c2"]
    used_again = [replace(models[0], idle_s=0.1), models[1]]
    assert state.observe(group_report(74, used_again), 0.2).page_out == ["c2"]


def test_a_group_that_does_not_allow_it_is_not_paged_out_and_the_static_one_goes_dynamic():
    state = CoordinatorState(CFG)
    d = state.observe(group_report(74, [tier("c1", idle_s=500.0)], allowed=False, mode="static"), 0.0)
    assert d.page_out == [] and d.mode == "dynamic"


def test_status_lists_the_group_s_models_tiers_and_the_floor():
    state = CoordinatorState(CFG)
    state.observe(group_report(50, [tier("a"), tier("b", "host")]), 0.0)
    (row,) = state.status(0.0)["gpus"][0]["replicas"]
    assert row["group"] == "resnets" and row["floor_bytes"] == 540 * MiB
    assert [(m["name"], m["tier"]) for m in row["models"]] == [("a", "gpu"), ("b", "host")]
    assert row["weights_bytes"] == 3 * GiB  # resident weights only


def test_a_group_replica_s_report_carries_its_resident_weights_tiers_and_floor():
    from deployments.gpu_identity import GpuIdentity
    from deployments.messages import Directive
    from deployments.reporting import ReplicaIdentity, directive_actions, make_report
    from engine_runtime import StatsSnapshot

    identity = ReplicaIdentity("g1", "resnets", GpuIdentity(REAL, 0, False, "node0"), 0, "not used", None,
                               floor_bytes=540 * MiB)
    stats = StatsSnapshot(weights_bytes=0, context_bytes_held=0, peak_context_bytes=0, last_context_bytes=0,
                          acquisitions=0, acquisition_p50_s=0.0, acquisition_p99_s=0.0, acquisition_total_s=0.0,
                          calls_ok=0, calls_invalid=0, calls_unavailable=0, calls_failed=0, calls_in_flight=0)
    from deployments.reporting import engine_figures

    figures = engine_figures(mode="dynamic", mechanism="vmm-arena", loaded=True, stats=stats,
                             largest_context_bytes=GiB)
    models = [tier("a"), tier("b", "host")]
    r = make_report(identity, figures, pid=1, pin="auto", reading=None, reading_error=None,
                    group={"weights_bytes": 3 * GiB, "group": "resnets", "models": models,
                           "page_out_under_pressure": True, "cold_after_s": 30.0})
    assert (r.weights_bytes, r.group, r.models, r.floor_bytes) == (3 * GiB, "resnets", models, 540 * MiB)
    actions = directive_actions(Directive("dynamic", None, page_out=["b"]), pin="auto", mode="dynamic")
    assert actions.page_out == ("b",) and actions.switch_to is None


def test_the_client_keeps_reporting_when_the_coordinator_is_unreachable(monkeypatch):
    import threading
    import time
    from types import SimpleNamespace

    from deployments import coordinator_client
    from deployments.coordinator_client import CoordinatorClient, ReplicaPorts
    from deployments.gpu_identity import GpuIdentity
    from deployments.reporting import ReplicaIdentity
    from engine_runtime import MemoryMode

    attempts = []

    def unreachable(cfg):
        attempts.append(time.monotonic())
        raise ConnectionError("coordinator restarting")

    monkeypatch.setattr(coordinator_client, "get_or_create", unreachable)
    engine = SimpleNamespace(mode=MemoryMode.DYNAMIC)
    ports = ReplicaPorts(identity=ReplicaIdentity("g1", "resnets", GpuIdentity("vgpu-x-0", None, True, "n"), 0),
                         engine=engine, admission=SimpleNamespace(), pool=None, max_shapes={}, pin=lambda: "auto")
    client = CoordinatorClient(ports, CoordinatorConfig(poll_interval_s=0.02))
    client.start()
    try:
        deadline = time.monotonic() + 10
        while len(attempts) < 3 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        assert len(attempts) >= 3, "the report loop stopped after the coordinator failed"
        assert client.last_contact()["error"] == "coordinator restarting"
    finally:
        client.stop()
