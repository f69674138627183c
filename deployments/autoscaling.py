"""Memory-aware autoscaling: Serve's load rule, but no replica where no card has room.

Serve's fractional GPUs are logical: nothing stops it from placing a fifth replica on
a full card. This policy scales on load exactly like Serve's default (desired =
ongoing requests / ``target_ongoing_requests``, then Serve's own factors, delays and
bounds), and caps a scale-up at the replicas that fit: a new replica needs its
weights plus one call's context memory, under the card's high watermark.

When a card would have room only once static replicas gave up their context memory,
the policy holds and asks the coordinator to make that room first: it reserves the
newcomers' bytes on the card, which the coordinator counts as used, so its policy
moves unpinned static replicas to dynamic; the next tick sees the room and scales.
The reservation ends when a replica registers on the card or after ``reserve_ttl_s``.

Pieces:

- :func:`decide_replicas` is the whole decision, over plain numbers (unit-tested).
- :func:`replica_stats` is what each replica returns from ``record_autoscaling_stats``
  (Serve calls it on the replica and ships the figures to its controller).
- :class:`MemoryAwarePolicy` is the thin adapter Serve calls in its controller::

    autoscaling_config:
      target_ongoing_requests: 4
      policy: {policy_function: "deployments.autoscaling:MemoryAwarePolicy",
               policy_kwargs: {namespace: ebb}}

Group replicas (``deployments.group``) report their resident weights plus *one*
call's context as their size (their engines draw context one call at a time), not
every model's weights (the group's ``gpu_weights_budget_bytes`` caps what a replica
keeps on the GPU; the rest waits in host memory until called).

Limits: Ray, not Ebb, picks the card a new replica lands on (by logical GPU
fractions); the count of replicas that fit is summed over the cards the deployment's
replicas report, so with several cards a replica may land on another card than the
one with room. Cards that none of the deployment's replicas use are not seen.
"""

from __future__ import annotations

import enum
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Names of the figures each replica reports through ``record_autoscaling_stats``.
STAT_GPU_KEY = "ebb_gpu_key"
STAT_REPLICA_BYTES = "ebb_replica_bytes"
STAT_ROOM_BYTES = "ebb_gpu_room_bytes"
STAT_RECLAIMABLE_BYTES = "ebb_gpu_reclaimable_bytes"


class ScaleReason(str, enum.Enum):
    """Why the policy answered what it did."""

    #: No scale-up wanted (steady or scaling down): Serve's load rule alone.
    LOAD = "load"
    #: Scaling up, every wanted replica fits.
    FITS = "fits"
    #: Scaling up by fewer than wanted: only some fit.
    PARTIAL_ROOM = "partial_room"
    #: Holding: room will exist once the coordinator moves static replicas to dynamic.
    WAITING_FOR_RECLAIM = "waiting_for_reclaim"
    #: Holding: no card has room, and none can be made.
    NO_ROOM = "no_room"
    #: Holding: no replica has reported its memory figures yet.
    MEMORY_UNKNOWN = "memory_unknown"


@dataclass(frozen=True)
class CardRoom:
    """One card as the deployment's replicas report it."""

    key: str
    #: Bytes a newcomer may take before the card passes its high watermark.
    room_bytes: int
    #: Static context bytes the coordinator may free by moving unpinned replicas to dynamic.
    reclaimable_bytes: int = 0


@dataclass(frozen=True)
class ScaleDecision:
    """How many replicas the deployment should have (Serve applies its factors,
    delays and bounds to it) and which cards the coordinator should make room on."""

    replicas: float
    reason: ScaleReason
    #: Bytes to reserve per card (keyed by ``CardRoom.key``): the newcomers' footprint.
    reserve_bytes: dict[str, int] = field(default_factory=dict)


def decide_replicas(*, current_replicas: int, starting_replicas: int, total_ongoing_requests: float,
                    target_ongoing_requests: float, replica_bytes: int | None,
                    cards: Sequence[CardRoom]) -> ScaleDecision:
    """Serve's load rule, capped by the replicas that fit on the cards.

    ``starting_replicas`` were decided before but are not running yet: their bytes
    are not in the cards' figures, so they take room first.
    """
    if target_ongoing_requests <= 0:
        raise ValueError(f"target_ongoing_requests must be > 0, got {target_ongoing_requests}")
    wanted = total_ongoing_requests / target_ongoing_requests
    planned = current_replicas + max(0, starting_replicas)
    if current_replicas == 0 or math.ceil(wanted) <= planned:
        return ScaleDecision(wanted if current_replicas else max(wanted, planned), ScaleReason.LOAD)
    if not replica_bytes or not cards:
        return ScaleDecision(planned, ScaleReason.MEMORY_UNKNOWN)
    fits = {c.key: max(0, c.room_bytes) // replica_bytes for c in cards}
    free_slots = sum(fits.values()) - max(0, starting_replicas)
    extra = math.ceil(wanted) - planned
    if free_slots >= extra:
        return ScaleDecision(wanted, ScaleReason.FITS)
    if free_slots > 0:
        return ScaleDecision(planned + free_slots, ScaleReason.PARTIAL_ROOM)
    # Nothing fits now: which cards would fit more once their static replicas went dynamic?
    short = extra
    reserve: dict[str, int] = {}
    for card in sorted(cards, key=lambda c: (-c.reclaimable_bytes, c.key)):
        if short <= 0:
            break
        more = (max(0, card.room_bytes) + card.reclaimable_bytes) // replica_bytes - fits[card.key]
        if more <= 0:
            continue
        take = min(short, more)
        reserve[card.key] = (fits[card.key] + take) * replica_bytes
        short -= take
    if reserve:
        return ScaleDecision(planned, ScaleReason.WAITING_FOR_RECLAIM, reserve)
    return ScaleDecision(planned, ScaleReason.NO_ROOM)


# -- the replica's side ------------------------------------------------------------


def gpu_key(uuid: str) -> float:
    """A card's identity as a number (Serve's custom metrics are numbers only)."""
    return float(zlib.crc32(uuid.encode()))


def replica_stats(gpu_uuid: str, weights_bytes: int, context_bytes: int, room_bytes: int | None,
                  reclaimable_bytes: int) -> dict[str, float]:
    """What a replica returns from ``record_autoscaling_stats``; empty until its card is known."""
    if room_bytes is None:
        return {}
    return {STAT_GPU_KEY: gpu_key(gpu_uuid), STAT_REPLICA_BYTES: float(weights_bytes + context_bytes),
            STAT_ROOM_BYTES: float(room_bytes), STAT_RECLAIMABLE_BYTES: float(reclaimable_bytes)}


def cards_from_stats(stats: Mapping[str, Mapping[Any, float]]) -> tuple[int | None, list[CardRoom], dict[str, Any]]:
    """``(a replica's bytes, the cards, one replica id per card)`` from Serve's
    aggregated metrics (metric name -> replica id -> value).

    Replicas on one card report the same card figures; the smallest is kept, so a
    figure averaged over Serve's look-back window while room shrank errs small.
    """
    keys = stats.get(STAT_GPU_KEY) or {}
    sizes = [v for v in (stats.get(STAT_REPLICA_BYTES) or {}).values() if v > 0]
    cards: dict[str, CardRoom] = {}
    anyone: dict[str, Any] = {}
    for replica, key in keys.items():
        room = (stats.get(STAT_ROOM_BYTES) or {}).get(replica)
        if room is None:
            continue
        name = str(int(key))
        card = CardRoom(name, int(room), int((stats.get(STAT_RECLAIMABLE_BYTES) or {}).get(replica, 0)))
        old = cards.get(name)
        if old is None or card.room_bytes < old.room_bytes:
            cards[name] = card
        anyone.setdefault(name, replica)
    return (int(max(sizes)) if sizes else None), list(cards.values()), anyone


# -- Serve's side -------------------------------------------------------------------


class MemoryAwarePolicy:
    """The autoscaling policy Serve's controller calls with an ``AutoscalingContext``.

    Serve instantiates it once per deployment with ``policy_kwargs`` and wraps it with
    its own scaling factors, delays and min/max bounds.
    """

    def __init__(self, namespace: str = "ebb", reserve_ttl_s: float = 15.0) -> None:
        self.namespace = namespace
        self.reserve_ttl_s = reserve_ttl_s
        self._coordinator = None
        self._metrics = None
        self._last_reserve: tuple[dict[str, int], float] = ({}, 0.0)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        stats = ctx.aggregated_metrics or {}
        replica_bytes, cards, anyone = cards_from_stats(stats)
        decision = decide_replicas(
            current_replicas=ctx.current_num_replicas,
            starting_replicas=max(0, ctx.target_num_replicas - ctx.current_num_replicas),
            total_ongoing_requests=ctx.total_num_requests,
            target_ongoing_requests=ctx.config.get_target_ongoing_requests(),
            replica_bytes=replica_bytes, cards=cards)
        self._record(ctx.deployment_name, decision.reason)
        if decision.reserve_bytes:
            self._reserve({anyone[k]: n for k, n in decision.reserve_bytes.items()})
        state = dict(ctx.policy_state or {})
        state["ebb_reason"] = decision.reason.value
        return decision.replicas, state

    def _record(self, deployment: str, reason: ScaleReason) -> None:
        try:
            if self._metrics is None:
                from deployments.metrics import AutoscalingMetrics

                self._metrics = AutoscalingMetrics()
            self._metrics.record(deployment, reason.value)
        except Exception as err:  # noqa: BLE001 - a metric must never stop the autoscaler
            logger.warning("ebb autoscaling: metric not recorded: %s", err)

    def _reserve(self, by_replica: Mapping[Any, int]) -> None:
        """Ask the coordinator for room, without waiting (this runs in Serve's control loop)."""
        wanted = {getattr(r, "unique_id", str(r)): n for r, n in by_replica.items()}
        now = time.monotonic()
        last, at = self._last_reserve
        # Renew well before the reservation lapses; do not send the same one every tick.
        if wanted == last and now - at < self.reserve_ttl_s / 3:
            return
        try:
            if self._coordinator is None:
                import ray

                from deployments.coordinator import COORDINATOR_NAME

                self._coordinator = ray.get_actor(COORDINATOR_NAME, namespace=self.namespace)
            for replica_id, nbytes in wanted.items():
                self._coordinator.reserve_room.remote(replica_id, nbytes, self.reserve_ttl_s)
            self._last_reserve = (wanted, now)
            logger.info("ebb autoscaling: asked the coordinator to make room: %s", wanted)
        except Exception as err:  # noqa: BLE001 - coordinator restarting: the next tick asks again
            self._coordinator = None
            logger.warning("ebb autoscaling: coordinator not reachable to make room: %s", err)
