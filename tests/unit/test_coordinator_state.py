"""The coordinator's logic without Ray (``CoordinatorState``): reports in, directives
out. Tables of report sequences on real GPUs (NVML readings) and virtual ones
(summed from the reports), replica expiry, NVML failing, pins, dwell, switches in
flight, the admission budget, and the bounded, explained history."""

from __future__ import annotations

import re
import pytest

from deployments.config import CoordinatorConfig
from deployments.coordinator import CoordinatorState
from deployments.messages import Directive, ReplicaReport
from deployments.policy import admission_capacity
from engine_runtime.pressure import GpuPressure
from engine_runtime.units import MiB, GiB

REAL = "GPU-11111111-2222-3333-4444-555555555555"
OTHER = "GPU-99999999-8888-7777-6666-555555555555"
VGPU = "vgpu-node0-0"
CFG = CoordinatorConfig(poll_interval_s=0.2, min_dwell_s=1.0, virtual_gpu_memory_bytes=1 * GiB)
#: What an 80 GiB card may give dynamic calls in all: everything but the headroom.
USABLE = 80 * GiB - 512 * MiB


def reading(used_gib: float, uuid: str = REAL, total_gib: float = 80.0) -> GpuPressure:
    total, used = int(total_gib * GiB), int(used_gib * GiB)
    return GpuPressure(uuid=uuid, index=0, total_bytes=total, used_bytes=used, reserved_bytes=0,
                       free_bytes=total - used, utilization_pct=0.0)


def report(rid: str, mode: str = "static", *, gpu: str = REAL, used_gib: float | None = 40.0,
           ctx: int = 4 * GiB, weights: int = 2 * GiB, held: int | None = None, pin: str = "auto",
           rate: float = 10.0, error: str | None = None) -> ReplicaReport:
    virtual = gpu.startswith("vgpu-")
    if held is None:
        held = ctx if mode == "static" else 0
    return ReplicaReport(
        replica_id=rid, model=f"model-{rid}", pid=1000, node_id="node0", gpu=gpu, virtual=virtual, pin=pin,
        mode=mode, mechanism="vmm_arena", weights_bytes=weights, context_bytes=ctx, held_bytes=held,
        request_rate_per_s=rate, latency_static_s=0.005, latency_dynamic_s=0.006, in_flight=0, loaded=True,
        reading=None if virtual or used_gib is None else reading(used_gib, gpu),
        reading_error=error,
    )


def gpu_status(state: CoordinatorState, uuid: str, now_s: float) -> dict:
    return next(g for g in state.status(now_s)["gpus"] if g["gpu"] == uuid)


# -- reports drive decisions -----------------------------------------------------------

# Each row: a sequence of (time, report) and the mode each directive carries back.
# 80 GiB cards, watermarks 75/85/90 %: high is 72 GiB, target 68 GiB, low 60 GiB.
SEQUENCES = [
    (
        "rising: the replica that reports 74 GiB is told to go dynamic",
        [(0.0, report("a", used_gib=74))],
        ["dynamic"],
    ),
    (
        "between the watermarks nothing moves",
        [(0.0, report("a", used_gib=65)), (0.0, report("b", "dynamic", used_gib=65)),
         (0.2, report("a", used_gib=65)), (0.2, report("b", "dynamic", used_gib=65))],
        ["static", "dynamic", "static", "dynamic"],
    ),
    (
        "falling: a dynamic replica goes static once use is under the low watermark",
        [(0.0, report("a", "dynamic", used_gib=74)), (0.2, report("a", "dynamic", used_gib=50))],
        ["dynamic", "static"],
    ),
    (
        "falling, but its context would not fit under the target: it stays dynamic",
        [(0.0, report("a", "dynamic", used_gib=59, ctx=10 * GiB))],
        ["dynamic"],
    ),
    (
        "flapping input: the dwell time holds the first decision",
        [(0.0, report("a", used_gib=74)), (0.2, report("a", "dynamic", used_gib=30)),
         (0.6, report("a", "dynamic", used_gib=74)), (1.3, report("a", "dynamic", used_gib=30))],
        ["dynamic", "dynamic", "dynamic", "static"],
    ),
    (
        "pinned static stays static under pressure",
        [(0.0, report("a", used_gib=79, pin="static"))],
        ["static"],
    ),
    (
        "pinned dynamic goes dynamic at once, whatever the pressure",
        [(0.0, report("a", used_gib=10, pin="dynamic"))],
        ["dynamic"],
    ),
]


@pytest.mark.parametrize("name,steps,modes", SEQUENCES, ids=[s[0] for s in SEQUENCES])
def test_reports_drive_decisions(name, steps, modes):
    state = CoordinatorState(CFG)
    got = [state.observe(r, t).mode for t, r in steps]
    assert got == modes


def test_cheapest_replica_goes_first_and_only_as_many_as_needed():
    # 74 GiB > 72: freeing one 8 GiB context brings it to 66 GiB <= 68 GiB target.
    state = CoordinatorState(CFG)
    state.observe(report("busy", used_gib=50, ctx=8 * GiB, rate=100.0), 0.0)
    state.observe(report("idle", used_gib=50, ctx=8 * GiB, rate=0.1), 0.0)
    assert state.observe(report("busy", used_gib=74, ctx=8 * GiB, rate=100.0), 0.1).mode == "static"
    assert state.observe(report("idle", used_gib=74, ctx=8 * GiB, rate=0.1), 0.2).mode == "dynamic"
    (entry,) = state.status(0.2)["history"]
    assert entry["replica_id"] == "idle" and entry["bytes_delta"] == -8 * GiB


def test_an_ordered_switch_counts_before_the_replica_confirms_it():
    # Two replicas on a virtual GPU; going dynamic with one of them is enough. The
    # second report comes in before the first replica obeyed: it must not switch too.
    state = CoordinatorState(CFG)
    ctx = 100 * MiB
    state.observe(report("a", gpu=VGPU, ctx=ctx, weights=100 * MiB, rate=1.0), 0.0)
    state.observe(report("b", gpu=VGPU, ctx=ctx, weights=100 * MiB, rate=5.0), 0.0)
    # 200 + 200 MiB replicas + 550 MiB external = 950 MiB of 1 GiB (92.8 %) > 90 %.
    state.inject_external_bytes(VGPU, 550 * MiB)
    assert state.observe(report("a", gpu=VGPU, ctx=ctx, weights=100 * MiB, rate=1.0), 0.1).mode == "dynamic"
    # 'a' has not switched yet (still reports static and holds its context).
    assert state.observe(report("b", gpu=VGPU, ctx=ctx, weights=100 * MiB, rate=5.0), 0.15).mode == "static"
    g = gpu_status(state, VGPU, 0.15)
    assert g["used_bytes"] == 950 * MiB
    assert g["projected_used_bytes"] == 850 * MiB


def test_going_static_two_replicas_room_for_one():
    # 1 GiB virtual GPU: low watermark 768 MiB, target 870.4 MiB; each replica takes
    # 300 MiB going static.
    state = CoordinatorState(CFG)
    kw = dict(gpu=VGPU, ctx=300 * MiB, weights=100 * MiB)
    state.inject_external_bytes(VGPU, 1 * GiB)
    for r in ("a", "b"):
        state.observe(report(r, "dynamic", **kw), 0.0)
    state.inject_external_bytes(VGPU, 400 * MiB)
    modes = [state.observe(report(r, "dynamic", **kw), 0.0).mode for r in ("a", "b")]
    assert modes == ["dynamic", "dynamic"]  # 600 MiB in use: 600 + 300 > 870.4, none fits
    state.inject_external_bytes(VGPU, 200 * MiB)  # 400 MiB: one fits (700), two do not (1000)
    modes = [state.observe(report(r, "dynamic", **kw), 0.1).mode for r in ("a", "b")]
    assert sorted(modes) == ["dynamic", "static"]


# -- virtual GPUs ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "external,replicas,expected_used",
    [
        (0, [], 0),
        (0, [("a", "static", 50 * MiB, 10 * MiB)], 60 * MiB),
        (300 * MiB, [("a", "static", 50 * MiB, 10 * MiB)], 360 * MiB),
        (300 * MiB, [("a", "static", 50 * MiB, 10 * MiB), ("b", "dynamic", 20 * MiB, 0)], 380 * MiB),
        # A dynamic replica with a call in flight holds that call's bytes.
        (0, [("a", "dynamic", 50 * MiB, 3 * MiB)], 53 * MiB),
    ],
    ids=["empty", "one static", "external counts", "two replicas", "call in flight"],
)
def test_virtual_gpu_used_is_external_plus_weights_plus_held(external, replicas, expected_used):
    state = CoordinatorState(CFG)
    state.inject_external_bytes(VGPU, external)
    for rid, mode, weights, held in replicas:
        state.observe(report(rid, mode, gpu=VGPU, ctx=10 * MiB, weights=weights, held=held), 0.0)
    g = gpu_status(state, VGPU, 0.0)
    assert g["virtual"] and g["known"]
    assert g["total_bytes"] == 1 * GiB
    assert g["used_bytes"] == expected_used
    assert g["pressure"] == pytest.approx(expected_used / GiB)


def test_external_bytes_drive_a_virtual_gpu_both_ways():
    state = CoordinatorState(CFG)
    kw = dict(gpu=VGPU, ctx=20 * MiB, weights=50 * MiB)
    assert state.observe(report("a", **kw), 0.0).mode == "static"
    state.inject_external_bytes(VGPU, 1 * GiB)
    assert state.observe(report("a", **kw), 0.1).mode == "dynamic"
    state.inject_external_bytes(VGPU, 0)
    # Dwell (1 s) first holds it, then it goes back.
    assert state.observe(report("a", "dynamic", **kw), 0.5).mode == "dynamic"
    assert state.observe(report("a", "dynamic", **kw), 1.2).mode == "static"


def test_a_small_virtual_gpu_has_a_target_no_headroom():
    # The 512 MiB headroom is for real cards; it would leave a 256 MiB virtual GPU no
    # target (nothing could ever go static) and eat into its budget.
    cfg = CoordinatorConfig(virtual_gpu_memory_bytes=256 * MiB, poll_interval_s=0.2)
    state = CoordinatorState(cfg)
    d = state.observe(report("a", "dynamic", gpu=VGPU, ctx=4 * MiB, weights=40 * MiB), 0.0)
    assert d.mode == "static"
    assert d.budget_bytes == 256 * MiB - (40 + 4) * MiB


def test_gpus_decide_separately():
    state = CoordinatorState(CFG)
    assert state.observe(report("a", used_gib=79, gpu=REAL), 0.0).mode == "dynamic"
    assert state.observe(report("b", used_gib=20, gpu=OTHER), 0.0).mode == "static"
    assert all(h["gpu"] == REAL for h in state.status(0.0)["history"])


# -- replicas that die, NVML that fails ------------------------------------------------

def test_a_silent_replica_leaves_the_view():
    state = CoordinatorState(CFG)
    state.observe(report("a", gpu=VGPU, ctx=10 * MiB, weights=100 * MiB), 0.0)
    state.observe(report("b", gpu=VGPU, ctx=10 * MiB, weights=100 * MiB), 0.0)
    assert gpu_status(state, VGPU, 0.0)["used_bytes"] == 220 * MiB
    # 'b' keeps reporting, 'a' goes silent past the expiry.
    t = state.expiry_s + 0.1
    state.observe(report("b", gpu=VGPU, ctx=10 * MiB, weights=100 * MiB), t)
    g = gpu_status(state, VGPU, t)
    assert [r["replica_id"] for r in g["replicas"]] == ["b"]
    assert g["used_bytes"] == 110 * MiB
    # Status alone expires too: nobody reports, everybody goes.
    assert gpu_status(state, VGPU, t + state.expiry_s + 0.1)["replicas"] == []


def test_a_dead_replica_comes_back_as_new_with_its_own_mode():
    state = CoordinatorState(CFG)
    state.observe(report("a", used_gib=74), 0.0)  # told dynamic
    # Silent past the expiry: a restarted replica (or a restarted coordinator) trusts the report.
    d = state.observe(report("a", "static", used_gib=65), state.expiry_s + 1.0)
    assert d.mode == "static"


@pytest.mark.parametrize("used_gib", [10.0, 79.0], ids=["would go static", "would go dynamic"])
def test_nvml_failing_holds_every_mode(used_gib):
    state = CoordinatorState(CFG)
    state.observe(report("s", "static", used_gib=65), 0.0)
    first = state.observe(report("d", "dynamic", used_gib=65), 0.0)
    assert first.budget_bytes == USABLE - 65 * GiB
    # NVML starts failing on that card; whatever the (stale) figures were, nothing moves,
    # and the budget keeps its last value rather than guess.
    for t in (2.0, 2.2, 2.4):
        for rid, mode in (("s", "static"), ("d", "dynamic")):
            d = state.observe(report(rid, mode, used_gib=None, error="NVML_ERROR_GPU_IS_LOST"), t)
            assert d.mode == mode
            assert d.budget_bytes == first.budget_bytes
    g = gpu_status(state, REAL, 2.4)
    assert g["known"] is False and g["pressure"] is None
    assert g["last_error"] == "NVML_ERROR_GPU_IS_LOST"
    assert state.status(2.4)["history"] == []
    # A fresh reading makes the GPU known again and decisions resume.
    d = state.observe(report("d", "dynamic", used_gib=used_gib), 3.0)
    assert gpu_status(state, REAL, 3.0)["known"] is True
    assert d.mode == ("static" if used_gib < 60 else "dynamic")


def test_a_pin_is_applied_on_an_unknown_gpu_too():
    state = CoordinatorState(CFG)
    d = state.observe(report("a", "static", used_gib=None, pin="dynamic", error="no NVML"), 0.0)
    assert d.mode == "dynamic"
    assert d.budget_bytes is None


# -- budget and history -----------------------------------------------------------------

def test_every_directive_carries_the_gpus_budget():
    state = CoordinatorState(CFG)
    d = state.observe(report("a", "dynamic", used_gib=66, held=1 * GiB), 0.0)
    assert isinstance(d, Directive)
    view = state.gpu_view(REAL)
    assert d.budget_bytes == admission_capacity(view, state.replica_views(REAL), state.policy)
    # usable - used 66 GiB + 1 GiB held by the call in flight
    assert d.budget_bytes == USABLE - 66 * GiB + 1 * GiB
    assert gpu_status(state, REAL, 0.0)["budget_bytes"] == d.budget_bytes


def test_a_replica_told_to_go_dynamic_gets_the_budget_after_the_switch():
    # Virtual 1 GiB: static use 100 + 300 + 600 = 1000 MiB > 921.6 MiB (90 %).
    state = CoordinatorState(CFG)
    state.inject_external_bytes(VGPU, 600 * MiB)
    d = state.observe(report("a", gpu=VGPU, ctx=300 * MiB, weights=100 * MiB), 0.0)
    assert d.mode == "dynamic"
    # The budget already counts the 300 MiB it gives up: 1024 - 700 MiB, not 1024 - 1000.
    assert d.budget_bytes == 1 * GiB - 700 * MiB


def test_history_is_bounded_and_every_decision_explained():
    cfg = CoordinatorConfig(poll_interval_s=0.2, min_dwell_s=0.0, history_size=5)
    state = CoordinatorState(cfg)
    t = 0.0
    for i in range(8):  # each step flips the replica: 16 decisions in all
        state.observe(report("a", "static", used_gib=79), t)
        state.observe(report("a", "dynamic", used_gib=10), t + 0.1)
        t += 0.2
    status = state.status(t)
    history = status["history"]
    assert len(history) == 5
    assert sum(status["decisions_by_reason"].values()) == 16
    for entry in history:
        assert entry["replica_id"] == "a" and entry["gpu"] == REAL and entry["new_mode"] in ("static", "dynamic")
        # The reason names the GPU and carries its figures: shares and sizes.
        assert REAL in entry["reason"]
        assert re.search(r"\d+\.\d%", entry["reason"]) and "GiB" in entry["reason"]
        assert entry["bytes_delta"] == (4 * GiB if entry["new_mode"] == "static" else -4 * GiB)
        assert entry["pressure_before"] is not None and entry["projected_after"] is not None
    assert history[-1]["new_mode"] == "static"
    # The replica's own row says why it was last moved.
    row = gpu_status(state, REAL, t)["replicas"][0]
    assert row["last_decision"] == history[-1]["reason"]


def test_forget_removes_a_replica_at_once():
    state = CoordinatorState(CFG)
    state.observe(report("a", gpu=VGPU, ctx=10 * MiB, weights=10 * MiB), 0.0)
    state.forget("a")
    assert gpu_status(state, VGPU, 0.0)["replicas"] == []


def test_on_a_real_gpu_the_budget_counts_a_free_once_nvml_shows_it():
    # 73 GiB of 80 (> 72): going dynamic frees 8 GiB. Until a reading shows them freed
    # the budget counts them as used; the decision itself already counts them freed.
    state = CoordinatorState(CFG)
    d = state.observe(report("a", used_gib=73, ctx=8 * GiB), 0.0)
    assert (d.mode, d.budget_bytes) == ("dynamic", USABLE - 73 * GiB)
    assert state.gpu_view(REAL).used_bytes == 65 * GiB
    d = state.observe(report("a", "dynamic", used_gib=65, ctx=8 * GiB), 0.1)
    assert (d.mode, d.budget_bytes) == ("dynamic", USABLE - 65 * GiB)
