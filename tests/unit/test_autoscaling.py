"""The memory-aware autoscaling decision (``deployments.autoscaling``), as tables of cases.

Plain numbers in, a replica count and a reason out; no Ray. A replica here needs
100 bytes (weights plus one call's context).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from deployments.autoscaling import (
    STAT_GPU_KEY,
    STAT_RECLAIMABLE_BYTES,
    STAT_REPLICA_BYTES,
    STAT_ROOM_BYTES,
    CardRoom,
    MemoryAwarePolicy,
    ScaleReason,
    cards_from_stats,
    decide_replicas,
    gpu_key,
    replica_stats,
)

NEED = 100


def card(room: int, reclaimable: int = 0, key: str = "a") -> CardRoom:
    return CardRoom(key, room, reclaimable)


CASES = [
    # id, current, starting, ongoing, target, cards -> replicas, reason, reserve
    ("steady load holds", 2, 0, 4.0, 2.0, [card(0)], 2.0, ScaleReason.LOAD, {}),
    ("less load scales down like Serve", 4, 0, 2.0, 2.0, [card(0)], 1.0, ScaleReason.LOAD, {}),
    ("scale-up that fits is Serve's number", 1, 0, 6.0, 2.0, [card(250)], 3.0, ScaleReason.FITS, {}),
    ("fractional demand that fits", 1, 0, 3.0, 2.0, [card(100)], 1.5, ScaleReason.FITS, {}),
    ("only one of three fits", 1, 0, 8.0, 2.0, [card(150)], 2, ScaleReason.PARTIAL_ROOM, {}),
    ("room summed over cards", 1, 0, 8.0, 2.0, [card(150, key="a"), card(250, key="b")], 4.0,
     ScaleReason.FITS, {}),
    ("no room, nothing to reclaim", 1, 0, 8.0, 2.0, [card(99)], 1, ScaleReason.NO_ROOM, {}),
    ("room once static replicas go dynamic: hold and reserve", 1, 0, 4.0, 2.0, [card(40, reclaimable=80)], 1,
     ScaleReason.WAITING_FOR_RECLAIM, {"a": 100}),
    ("reserve no more than the shortfall", 1, 0, 4.0, 2.0, [card(40, reclaimable=1000)], 1,
     ScaleReason.WAITING_FOR_RECLAIM, {"a": 100}),
    ("reserve on the card with most to reclaim first", 1, 0, 6.0, 2.0,
     [card(50, 60, key="a"), card(10, 300, key="b")], 1, ScaleReason.WAITING_FOR_RECLAIM, {"b": 200}),
    ("reclaim too small to fit one", 1, 0, 4.0, 2.0, [card(40, reclaimable=50)], 1, ScaleReason.NO_ROOM, {}),
    ("replicas still starting take the room first", 1, 1, 8.0, 2.0, [card(150)], 2, ScaleReason.NO_ROOM, {}),
    ("starting replicas and room for one more", 1, 1, 8.0, 2.0, [card(250)], 3, ScaleReason.PARTIAL_ROOM, {}),
    ("demand met by starting replicas: Serve's rule", 1, 2, 6.0, 2.0, [card(0)], 3.0, ScaleReason.LOAD, {}),
    ("no replica running: Serve's rule, no memory check", 0, 0, 4.0, 2.0, [], 2.0, ScaleReason.LOAD, {}),
    ("no replica running, some starting", 0, 1, 0.0, 2.0, [], 1, ScaleReason.LOAD, {}),
    ("no figures yet: hold", 1, 0, 8.0, 2.0, [], 1, ScaleReason.MEMORY_UNKNOWN, {}),
    ("negative room counts as none", 1, 0, 4.0, 2.0, [card(-500)], 1, ScaleReason.NO_ROOM, {}),
]


@pytest.mark.parametrize("current, starting, ongoing, target, cards, replicas, reason, reserve",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision_table(current, starting, ongoing, target, cards, replicas, reason, reserve):
    d = decide_replicas(current_replicas=current, starting_replicas=starting, total_ongoing_requests=ongoing,
                        target_ongoing_requests=target, replica_bytes=NEED, cards=cards)
    assert (d.replicas, d.reason, d.reserve_bytes) == (replicas, reason, reserve)


def test_never_adds_more_replicas_than_fit():
    for room in range(0, 1000, 37):
        for ongoing in range(0, 40, 3):
            d = decide_replicas(current_replicas=1, starting_replicas=0, total_ongoing_requests=float(ongoing),
                                target_ongoing_requests=2.0, replica_bytes=NEED, cards=[card(room)])
            added = max(0, math.ceil(d.replicas) - 1)
            assert added <= room // NEED, (room, ongoing, d)


def test_unknown_replica_size_holds():
    d = decide_replicas(current_replicas=1, starting_replicas=0, total_ongoing_requests=10.0,
                        target_ongoing_requests=1.0, replica_bytes=None, cards=[card(10**9)])
    assert (d.replicas, d.reason) == (1, ScaleReason.MEMORY_UNKNOWN)


def test_target_must_be_positive():
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        decide_replicas(current_replicas=1, starting_replicas=0, total_ongoing_requests=1.0,
                        target_ongoing_requests=0.0, replica_bytes=NEED, cards=[])


# -- figures between replicas and the policy ------------------------------------------


def test_replica_stats_are_numbers_and_empty_until_the_card_is_known():
    assert replica_stats("GPU-1", 60, 40, None, 0) == {}
    stats = replica_stats("GPU-1", 60, 40, 500, 30)
    assert all(isinstance(v, float) for v in stats.values())
    assert stats == {STAT_GPU_KEY: gpu_key("GPU-1"), STAT_REPLICA_BYTES: 100.0, STAT_ROOM_BYTES: 500.0,
                     STAT_RECLAIMABLE_BYTES: 30.0}
    assert gpu_key("GPU-1") != gpu_key("GPU-2")


def test_cards_from_stats_groups_replicas_by_card_and_keeps_the_smallest_room():
    stats: dict[str, dict[str, float]] = {}
    for rid, uuid, room in (("r1", "GPU-1", 500), ("r2", "GPU-1", 300), ("r3", "GPU-2", 900)):
        for k, v in replica_stats(uuid, 60, 40, room, 10).items():
            stats.setdefault(k, {})[rid] = v
    size, cards, anyone = cards_from_stats(stats)
    assert size == 100
    by_room = sorted(c.room_bytes for c in cards)
    assert by_room == [300, 900]
    assert set(anyone.values()) <= {"r1", "r2", "r3"} and len(anyone) == 2


def test_cards_from_empty_stats():
    assert cards_from_stats({}) == (None, [], {})


def test_adapter_reads_serve_context_and_reports_the_reason():
    policy = MemoryAwarePolicy()
    policy._record = lambda deployment, reason: None  # no Ray metrics in unit tests
    stats: dict[str, dict[str, float]] = {}
    for k, v in replica_stats("GPU-1", 60, 40, 1000, 0).items():
        stats.setdefault(k, {})["r1"] = v
    ctx = SimpleNamespace(aggregated_metrics=stats, current_num_replicas=1, target_num_replicas=1,
                          total_num_requests=6.0, config=SimpleNamespace(get_target_ongoing_requests=lambda: 2.0),
                          deployment_name="encoder", policy_state={"kept": 1})
    replicas, state = policy(ctx)
    assert replicas == 3.0
    assert state == {"kept": 1, "ebb_reason": "fits"}


# -- the coordinator's side: room, reclaimable bytes, reservations --------------------


def _vreport(rid: str, mode: str, pin: str = "auto"):
    from deployments.messages import ReplicaReport

    ctx = 100 * 2**20
    return ReplicaReport(
        replica_id=rid, model="m", pid=1, node_id="n", gpu="vgpu-n-0", virtual=True, pin=pin, mode=mode,
        mechanism="host_accounting", weights_bytes=200 * 2**20, context_bytes=ctx,
        held_bytes=ctx if mode == "static" else 0, request_rate_per_s=1.0, latency_static_s=0.01,
        latency_dynamic_s=0.01, in_flight=0, loaded=True)


def test_coordinator_room_and_reservation_move_static_replicas_to_dynamic():
    from deployments.config import CoordinatorConfig
    from deployments.coordinator import CoordinatorState

    MiB = 2**20
    # 1000 MiB card, high watermark 90 %: 900 MiB usable. Two static replicas use 600 MiB.
    state = CoordinatorState(CoordinatorConfig(poll_interval_s=0.2, min_dwell_s=0.0, low_watermark=0.5,
                                               target=0.8, high_watermark=0.9,
                                               virtual_gpu_memory_bytes=1000 * MiB))
    state.observe(_vreport("a", "static"), 0.0)
    d = state.observe(_vreport("b", "static"), 0.0)
    assert (d.room_bytes, d.reclaimable_bytes) == (int(0.9 * 1000 * MiB) - 600 * MiB, 200 * MiB)
    # A third replica of 350 MiB fits only if a static block goes: hold room for it.
    assert state.reserve_room("a", 350 * MiB, now_s=0.1, ttl_s=10.0)
    d = state.observe(_vreport("a", "static"), 0.2)
    modes = {rid: r.desired_mode for rid, r in state.replicas.items()}
    assert "dynamic" in modes.values()
    assert d.room_bytes >= 350 * MiB  # the reservation itself is not counted against the room
    assert not state.reserve_room("nobody", 1, now_s=0.3, ttl_s=1.0)
    # The replica arrives: the reservation ends.
    state.observe(_vreport("c", "dynamic"), 0.4)
    assert state.gpus["vgpu-n-0"].reserved_bytes == 0
