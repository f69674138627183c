"""The coordinator's pure policy, as tables of scenarios: rising and falling pressure,
flapping input, pins, dead replicas, empty and unknown GPUs, two GPUs, cost ordering,
the admission capacity formula and the context pool's target size."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deployments.policy import (
    Decision,
    GpuView,
    Pin,
    PolicyConfig,
    ReplicaView,
    admission_capacity,
    decide,
    pool_target_bytes,
)
from engine_runtime.memory import MemoryMode
from engine_runtime.units import GiB

S, D = MemoryMode.STATIC, MemoryMode.DYNAMIC
CFG = PolicyConfig()  # 0.75 / 0.85 / 0.90, dwell 5 s, headroom 512 MiB
NOW = 1000.0


def gpu(used_gib: float, uuid: str = "GPU-a", total_gib: float = 80.0, known: bool = True) -> GpuView:
    return GpuView(uuid, int(total_gib * GiB), int(used_gib * GiB), known)


def rep(
    rid: str,
    mode: MemoryMode = S,
    ctx_gib: float = 2.0,
    rate: float = 10.0,
    lat: tuple[float | None, float | None] = (0.005, 0.006),
    pin: Pin = Pin.AUTO,
    gpu_uuid: str = "GPU-a",
    last_switch_s: float | None = None,
    alive: bool = True,
    held_gib: float = 0.0,
) -> ReplicaView:
    return ReplicaView(
        replica_id=rid,
        gpu_uuid=gpu_uuid,
        model=f"model-{rid}",
        mode=mode,
        pin=pin,
        weights_bytes=GiB,
        context_bytes=int(ctx_gib * GiB),
        request_rate_per_s=rate,
        latency_static_s=lat[0],
        latency_dynamic_s=lat[1],
        in_flight=0,
        last_switch_s=last_switch_s,
        alive=alive,
        context_bytes_held=int(held_gib * GiB),
    )


def moves(decisions: list[Decision]) -> list[tuple[str, str]]:
    return [(d.replica_id, d.new_mode.value) for d in decisions]


# Each row: (name, gpus, replicas, expected [(replica, new mode)] in decision order).
SCENARIOS = [
    # -- rising pressure: 74 GiB of 80 = 92.5% > 90%; target 85% = 68 GiB, so free >= 6 GiB.
    (
        "rising: cheapest per byte first until under target",
        [gpu(74)],
        [rep("a", ctx_gib=4, rate=100), rep("b", ctx_gib=4, rate=1), rep("c", ctx_gib=4, rate=10)],
        [("b", "dynamic"), ("c", "dynamic")],
    ),
    (
        "rising: one big replica suffices",
        [gpu(74)],
        [rep("a", ctx_gib=8, rate=1), rep("b", ctx_gib=2, rate=1)],
        [("a", "dynamic")],
    ),
    (
        "rising: not enough to free, all auto static replicas go",
        [gpu(79)],
        [rep("a", ctx_gib=2), rep("b", ctx_gib=3), rep("c", mode=D, ctx_gib=4)],
        [("b", "dynamic"), ("a", "dynamic")],
    ),
    ("at the high watermark exactly: hold", [gpu(72)], [rep("a")], []),
    ("between the watermarks: hold", [gpu(65)], [rep("a"), rep("b", mode=D)], []),
    # -- falling pressure: 50 GiB of 80 = 62.5% < 75%; room to target: 18 GiB.
    (
        "falling: greatest benefit first, all that fit",
        [gpu(50)],
        [rep("a", mode=D, rate=1), rep("b", mode=D, rate=100), rep("c", mode=D, rate=10)],
        [("b", "static"), ("c", "static"), ("a", "static")],
    ),
    (
        "falling: one that does not fit is skipped, smaller ones still go",
        [gpu(58)],
        [rep("big", mode=D, ctx_gib=12, rate=100), rep("small", mode=D, ctx_gib=4, rate=1)],
        [("small", "static")],
    ),
    (
        "falling: idle replicas go back too, last",
        [gpu(50)],
        [rep("idle", mode=D, rate=0.0), rep("busy", mode=D, rate=5)],
        [("busy", "static"), ("idle", "static")],
    ),
    (
        "falling: nothing fits under the target: hold",
        [gpu(59.5)],
        [rep("a", mode=D, ctx_gib=9)],
        [],
    ),
    # -- dwell: a replica that just switched holds, whatever the pressure.
    ("dwell: just went static, pressure spikes: hold", [gpu(78)], [rep("a", last_switch_s=NOW - 1.0)], []),
    ("dwell: just went dynamic, pressure drops: hold", [gpu(10)], [rep("a", mode=D, last_switch_s=NOW - 4.9)], []),
    ("dwell over: moves", [gpu(78)], [rep("a", last_switch_s=NOW - 5.0)], [("a", "dynamic")]),
    (
        "dwell: the next eligible replica moves instead",
        [gpu(74)],
        [rep("a", rate=0, last_switch_s=NOW - 1.0), rep("b", ctx_gib=8, rate=50)],
        [("b", "dynamic")],
    ),
    # -- pins.
    (
        "pinned static stays static under pressure",
        [gpu(79)],
        [rep("p", pin=Pin.STATIC, rate=0), rep("a", ctx_gib=12)],
        [("a", "dynamic")],
    ),
    (
        "pinned dynamic stays dynamic with room",
        [gpu(10)],
        [rep("p", mode=D, pin=Pin.DYNAMIC), rep("a", mode=D)],
        [("a", "static")],
    ),
    (
        "a pin is applied at once, dwell or not, and its bytes count",
        [gpu(74)],
        [rep("p", pin=Pin.DYNAMIC, ctx_gib=4, last_switch_s=NOW), rep("a", ctx_gib=4, rate=0)],
        [("p", "pinned"), ("a", "dynamic")],
    ),
    (
        "a pin that frees enough spares the auto replicas",
        [gpu(74)],
        [rep("p", pin=Pin.DYNAMIC, ctx_gib=8), rep("a", ctx_gib=4, rate=0)],
        [("p", "pinned")],
    ),
    # -- dead replicas, empty and unknown GPUs.
    ("a dead replica is ignored", [gpu(79)], [rep("dead", alive=False, rate=0), rep("a")], [("a", "dynamic")]),
    ("only dead replicas: nothing", [gpu(79)], [rep("dead", alive=False)], []),
    ("a GPU with no replicas yields nothing", [gpu(79), gpu(10, "GPU-b")], [], []),
    ("replicas of a GPU not in the views are ignored", [gpu(79)], [rep("x", gpu_uuid="GPU-zzz")], []),
    ("unknown GPU: dynamic replicas are not sent static", [gpu(0, known=False)], [rep("a", mode=D)], []),
    ("unknown GPU: static replicas hold too", [gpu(0, known=False)], [rep("a")], []),
    (
        "unknown GPU: pins still apply",
        [gpu(0, known=False)],
        [rep("p", pin=Pin.DYNAMIC), rep("a")],
        [("p", "pinned")],
    ),
    # -- two GPUs, decided separately.
    (
        "two GPUs: one under pressure, one with room",
        [gpu(78, "GPU-a"), gpu(20, "GPU-b")],
        [rep("a1", gpu_uuid="GPU-a", ctx_gib=8), rep("b1", mode=D, gpu_uuid="GPU-b")],
        [("a1", "dynamic"), ("b1", "static")],
    ),
    (
        "two GPUs: pressure on one does not move the other's replicas",
        [gpu(79, "GPU-a"), gpu(65, "GPU-b")],
        [rep("a1", gpu_uuid="GPU-a", ctx_gib=1), rep("b1", gpu_uuid="GPU-b", rate=0, ctx_gib=30)],
        [("a1", "dynamic")],
    ),
    # -- ordering by latency cost per byte freed.
    (
        "cost per byte, not cost: a busy big replica beats an idle-ish small one",
        # per GiB freed: big 100/s × 1 ms / 16 GiB = 6.25 ms/s, small 2/s × 1 ms / 0.25 GiB = 8 ms/s.
        [gpu(74)],
        [rep("small", ctx_gib=0.25, rate=2), rep("big", ctx_gib=16, rate=100)],
        [("big", "dynamic")],
    ),
    (
        "measured latencies: a replica whose dynamic mode costs nothing goes first",
        [gpu(74)],
        [rep("slow", ctx_gib=8, lat=(0.005, 0.050), rate=1), rep("free", ctx_gib=8, lat=(0.005, 0.004), rate=100)],
        [("free", "dynamic")],
    ),
    (
        "unknown latencies use the default penalty (1 ms)",
        [gpu(74)],
        # known: 10/s × 2 ms; unknown: 10/s × 1 ms (default) -> unknown is cheaper.
        [rep("known", ctx_gib=8, lat=(0.005, 0.007)), rep("unknown", ctx_gib=8, lat=(None, 0.007))],
        [("unknown", "dynamic")],
    ),
]


@pytest.mark.parametrize(
    "gpus, replicas, expected", [row[1:] for row in SCENARIOS], ids=[row[0] for row in SCENARIOS]
)
def test_scenarios(gpus, replicas, expected):
    decisions = decide(gpus, replicas, CFG, NOW)
    got = [(d.replica_id, "pinned" if "pinned" in d.reason else d.new_mode.value) for d in decisions]
    assert got == expected


def test_rising_decisions_carry_the_figures():
    decisions = decide([gpu(74)], [rep("a", ctx_gib=4, rate=1), rep("b", ctx_gib=4, rate=10)], CFG, NOW)
    first, second = decisions
    assert first.bytes_delta == -4 * GiB and first.gpu_uuid == "GPU-a"
    assert first.pressure_before == pytest.approx(74 / 80)
    assert first.projected_after == pytest.approx(70 / 80)
    assert second.pressure_before == pytest.approx(70 / 80)
    assert second.projected_after == pytest.approx(66 / 80) and second.projected_after <= CFG.target
    assert "92.5%" in first.reason and "high watermark 90%" in first.reason and "4.00 GiB" in first.reason


def test_falling_decision_never_projects_past_the_target():
    decisions = decide([gpu(40)], [rep(str(i), mode=D, ctx_gib=5) for i in range(10)], CFG, NOW)
    assert len(decisions) == 5  # 40 + 5 × 5 = 65 <= 68 GiB; a sixth would make 70
    assert all(d.projected_after <= CFG.target for d in decisions)
    assert decisions[-1].bytes_delta == 5 * GiB and "low watermark 75%" in decisions[-1].reason


def test_flapping_input_settles():
    """Pressure alternating around both watermarks every poll moves a replica at most
    once per dwell time."""
    r = rep("a")
    switches = []
    t = NOW
    for step in range(100):  # 50 s of polls at 0.5 s
        used = 79 if step % 2 == 0 else 10
        for d in decide([gpu(used)], [r], CFG, t):
            switches.append(t)
            r = replace(r, mode=d.new_mode, last_switch_s=t)
        t += CFG.poll_interval_s
    gaps = [b - a for a, b in zip(switches, switches[1:])]
    assert switches and all(g >= CFG.min_dwell_s for g in gaps)
    assert len(switches) <= 50 / CFG.min_dwell_s + 1


def test_hysteresis_without_dwell_does_not_oscillate():
    """After going dynamic the card sits between the watermarks: no switch back."""
    cfg = replace(CFG, min_dwell_s=0.0)
    r = rep("a", ctx_gib=6)
    (d,) = decide([gpu(74)], [r], cfg, NOW)
    r = replace(r, mode=d.new_mode, last_switch_s=NOW)
    assert decide([gpu(74 - 6)], [r], cfg, NOW + 0.5) == []


def test_pressure_from_outside_pushes_and_releases():
    """Another process takes 30 GiB: replicas go dynamic; it leaves: they come back."""
    replicas = [rep(str(i), ctx_gib=6) for i in range(4)]
    own = 4 * (1 + 6) + 20  # weights + static contexts + other things of ours
    down = decide([gpu(own + 30)], replicas, CFG, NOW)
    assert {d.new_mode for d in down} == {D} and len(down) >= 1
    replicas = [replace(r, mode=D, last_switch_s=NOW) if r.replica_id in {d.replica_id for d in down} else r
                for r in replicas]
    freed = sum(-d.bytes_delta for d in down) / GiB
    up = decide([gpu(own - freed)], replicas, CFG, NOW + CFG.min_dwell_s)
    assert sorted(d.replica_id for d in up) == sorted(d.replica_id for d in down)
    assert {d.new_mode for d in up} == {S}


def test_small_card_target_respects_headroom():
    cfg = PolicyConfig(headroom_bytes=GiB)
    assert cfg.target_bytes(4 * GiB) == 3 * GiB  # 0.85 × 4 = 3.4 GiB > 4 − 1
    assert cfg.target_bytes(80 * GiB) == int(0.85 * 80 * GiB)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"high_watermark": 1.5}, "high_watermark"),
        ({"low_watermark": 0.0}, "low_watermark"),
        ({"low_watermark": 0.9, "target": 0.85}, "low_watermark <= target"),
        ({"target": 0.95}, "target <= high_watermark"),
        ({"min_dwell_s": -1}, "min_dwell_s"),
        ({"poll_interval_s": 0}, "poll_interval_s"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**kwargs)


def test_pin_parse():
    assert Pin.parse("Static") is Pin.STATIC and Pin.parse(Pin.AUTO) is Pin.AUTO
    assert Pin.DYNAMIC.mode is D and Pin.AUTO.mode is None
    with pytest.raises(ValueError, match="expected one of"):
        Pin.parse("sometimes")


# -- admission capacity: max(0, total − min(headroom, total/20) − used + held by dynamic calls)
USABLE = 80 * GiB - CFG.headroom_bytes  # 512 MiB headroom on an 80 GiB card
CAPACITY = [
    ("room below the target", gpu(50), [], USABLE - 50 * GiB),
    ("over the target: what is really free, not nothing", gpu(75), [], USABLE - 75 * GiB),
    ("full card: nothing", gpu(80), [], 0),
    (
        "dynamic calls in flight are added back",
        gpu(70),
        [rep("a", mode=D, held_gib=3), rep("b", mode=D, held_gib=0)],
        USABLE - 70 * GiB + 3 * GiB,
    ),
    (
        "static holdings, dead and other GPUs' replicas are not added back",
        gpu(60),
        [rep("s", held_gib=2), rep("d", mode=D, held_gib=2, alive=False), rep("o", mode=D, held_gib=2, gpu_uuid="GPU-b")],
        USABLE - 60 * GiB,
    ),
    ("unknown GPU: keep the budget as it is", gpu(0, known=False), [rep("a", mode=D, held_gib=1)], None),
]


@pytest.mark.parametrize("g, replicas, expected", [row[1:] for row in CAPACITY], ids=[row[0] for row in CAPACITY])
def test_admission_capacity(g, replicas, expected):
    got = admission_capacity(g, replicas, CFG)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=16)  # int() rounding of 0.85 × total


# -- context pool target: grow into room up to every pooled replica calling at once (and
# max_bytes), shrink by the excess over the target under pressure, never below the static
# leases plus one dynamic call. 80 GiB card: target 68 GiB, high watermark 72 GiB.
CHUNK = 64 * 2**20
POOL = [
    # (name, gpu, pool GiB, max_bytes, replicas, expected GiB or None)
    ("room: grows, up to every replica calling at once", gpu(40), 2, None,
     [rep("a", D, ctx_gib=1), rep("b", D, ctx_gib=1), rep("c", D, ctx_gib=1)], 3),
    ("room, capped by max_bytes", gpu(40), 2, 2 * GiB,
     [rep("a", D, ctx_gib=1), rep("b", D, ctx_gib=1), rep("c", D, ctx_gib=1)], 2),
    ("growth limited by the room under the target", gpu(66), 1, None,
     [rep(r, D, ctx_gib=2) for r in "abcd"], 3),
    ("between the target and the high watermark: hold", gpu(70), 2, None,
     [rep("a", D, ctx_gib=1), rep("b", D, ctx_gib=1), rep("c", D, ctx_gib=1)], 2),
    ("pressure (another process): shrinks by the excess", gpu(73), 10, None,
     [rep(r, D, ctx_gib=2) for r in "abcdef"], 5),
    ("heavy pressure: down to one dynamic call", gpu(74), 3, None,
     [rep("a", D, ctx_gib=1), rep("b", D, ctx_gib=1), rep("c", D, ctx_gib=1)], 1),
    ("heavy pressure: static standing leases stay", gpu(78), 6, None,
     [rep("a", S, ctx_gib=2), rep("b", S, ctx_gib=2), rep("c", D, ctx_gib=1)], 5),
    ("max_bytes wins over the floor", gpu(78), 6, 3 * GiB,
     [rep("a", S, ctx_gib=2), rep("b", S, ctx_gib=2)], 3),
    ("max_bytes is rounded down to whole chunks", gpu(10), 0, 3 * GiB - 1, [rep("a", D, ctx_gib=4)],
     3 - CHUNK / GiB),
    ("contexts round up to whole chunks", gpu(10), 0, None,
     [rep("a", D, ctx_gib=100 / 1024), rep("b", D, ctx_gib=100 / 1024)], 256 / 1024),
    ("replicas gone: shrinks to what is left", gpu(30), 8, None, [rep("a", D, ctx_gib=1)], 1),
    ("nothing loaded yet (no context known): holds nothing", gpu(30), 2, None, [rep("a", D, ctx_gib=0)], 0),
    ("dead replicas and other GPUs' do not count", gpu(30), 0, None,
     [rep("a", D, ctx_gib=1), rep("d", D, ctx_gib=4, alive=False), rep("o", S, ctx_gib=4, gpu_uuid="GPU-b")], 1),
    ("unknown GPU: leave the pool as it is", gpu(0, known=False), 4, None, [rep("a", D, ctx_gib=1)], None),
]


@pytest.mark.parametrize("g, pool_gib, max_bytes, replicas, expected", [row[1:] for row in POOL],
                         ids=[row[0] for row in POOL])
def test_pool_target_bytes(g, pool_gib, max_bytes, replicas, expected):
    got = pool_target_bytes(g, int(pool_gib * GiB), CFG, max_bytes, replicas=replicas, chunk_bytes=CHUNK)
    if expected is None:
        assert got is None
    else:
        assert got == int(expected * GiB)
        assert got % CHUNK == 0


def test_pool_target_follows_pressure_from_other_processes_down_and_back_up():
    replicas = [rep(r, D, ctx_gib=2) for r in "abcd"]  # the pool is useful up to 8 GiB
    pool = 8 * GiB
    # (GiB other processes hold, pool GiB expected after the step); the card sees others + pool.
    for others_gib, expected_gib in [(52, 8), (66, 2), (68, 2), (62, 6), (55, 8)]:
        g = gpu(others_gib + pool / GiB)
        pool = pool_target_bytes(g, pool, CFG, None, replicas=replicas, chunk_bytes=CHUNK)
        assert pool == expected_gib * GiB, (others_gib, pool / GiB)
