"""The policy's rule for groups (3a): above the high watermark, cold weights leave the
GPU before any static replica goes dynamic; decisions name the models and say why."""

from __future__ import annotations

import pytest

from deployments.policy import ColdModel, GpuView, Pin, PolicyConfig, ReplicaView, decide
from engine_runtime.memory import MemoryMode

GiB, MiB = 2**30, 2**20
S, D = MemoryMode.STATIC, MemoryMode.DYNAMIC
CFG = PolicyConfig(min_dwell_s=0.0)  # 0.75 / 0.85 / 0.90; target 68 GiB of 80
NOW = 1000.0


def gpu(used_gib: float) -> GpuView:
    return GpuView("GPU-a", 80 * GiB, int(used_gib * GiB))


def rep(rid: str, mode: MemoryMode = S, ctx_gib: float = 2.0, cold: tuple[ColdModel, ...] = (),
        pin: Pin = Pin.AUTO, alive: bool = True) -> ReplicaView:
    return ReplicaView(replica_id=rid, gpu_uuid="GPU-a", model=rid, mode=mode, pin=pin, weights_bytes=GiB,
                       context_bytes=int(ctx_gib * GiB), request_rate_per_s=10.0, latency_static_s=0.005,
                       latency_dynamic_s=0.006, in_flight=0, last_switch_s=None, alive=alive, cold_models=cold)


def cold(name: str, gib: float, idle_s: float) -> ColdModel:
    return ColdModel(name, int(gib * GiB), idle_s)


def summary(decisions):
    return [(d.replica_id, d.page_out if d.new_mode is None else d.new_mode.value) for d in decisions]


@pytest.mark.parametrize("used_gib, replicas, expected", [
    # 74 GiB, 6 over the target: the longest idle (a.m1, 4 GiB) then the next (b.m3, 3 GiB).
    (74, [rep("a", cold=(cold("m1", 4, 600), cold("m2", 4, 60))), rep("b", cold=(cold("m3", 3, 300),))],
     [("a", ("m1",)), ("b", ("m3",))]),
    # Cold weights are not enough: the static replica goes dynamic after them.
    (74, [rep("a", cold=(cold("m1", 1, 600),)), rep("s", ctx_gib=8)],
     [("a", ("m1",)), ("s", "dynamic")]),
    # Enough cold weights: no static replica is slowed.
    (73, [rep("a", cold=(cold("m1", 5, 600),)), rep("s", ctx_gib=8)], [("a", ("m1",))]),
    # Between the watermarks nothing moves, cold or not (hysteresis).
    (70, [rep("a", cold=(cold("m1", 4, 600),))], []),
    # Equal idleness: the larger first (fewer page-ins for the bytes freed).
    (72.5, [rep("a", mode=D, cold=(cold("small", 1, 100), cold("big", 5, 100)))], [("a", ("big",))]),
    # Pinned replicas still page out cold weights: pins are about modes.
    (73, [rep("p", pin=Pin.STATIC, cold=(cold("m1", 5, 100),))], [("p", ("m1",))]),
    # A dead replica's cold models are not counted.
    (73, [rep("dead", alive=False, cold=(cold("m1", 5, 100),)), rep("s", ctx_gib=8)], [("s", "dynamic")]),
    # Several models of one replica in one decision, longest idle first.
    (75, [rep("a", mode=D, cold=(cold("m1", 3, 50), cold("m2", 3, 500), cold("m3", 3, 5)))],
     [("a", ("m2", "m1", "m3"))]),
])
def test_cold_weights_leave_first(used_gib, replicas, expected):
    assert summary(decide([gpu(used_gib)], replicas, CFG, NOW)) == expected


def test_a_page_out_decision_says_which_models_why_and_what_it_frees():
    (d,) = decide([gpu(73)], [rep("a", mode=D, cold=(cold("resnet-c", 5, 120),))], CFG, NOW)
    assert d.new_mode is None and d.page_out == ("resnet-c",)
    assert d.bytes_delta == -5 * GiB
    assert "above the high watermark 90%" in d.reason and "paging out cold weights frees 5.00 GiB" in d.reason
    assert "resnet-c (5120 MiB, idle 120 s)" in d.reason
    assert d.pressure_before == pytest.approx(73 / 80) and d.projected_after == pytest.approx(68 / 80)


def test_on_an_unknown_gpu_nothing_is_paged_out():
    unknown = GpuView("GPU-a", 0, 0, known=False)
    assert decide([unknown], [rep("a", cold=(cold("m1", 5, 600),))], CFG, NOW) == []
