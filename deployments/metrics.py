"""Ebb's metrics, exported through ``ray.util.metrics`` beside Ray's and Serve's own.

They appear on every node's Prometheus endpoint (``ray_`` prefixed, counters with
``_total``), so a Grafana board built for Ray Serve picks them up. Nothing here runs
on the request path: engines keep cheap local counters (``engine_runtime.stats``);
each replica's report loop turns them into metric updates (counters by their deltas,
each new acquisition observed once), and the coordinator publishes its per-GPU view
and its decisions after the reports it decides on.

Names (before Ray's prefix) and tags; replica metrics carry model, replica, gpu:

- ``ebb_replica_mode`` (gauge, tag mode: 1 for the mode the replica is in, else 0)
- ``ebb_replica_context_bytes_held``, ``ebb_replica_weights_bytes`` (gauges)
- ``ebb_replica_context_acquisitions`` (counter), ``ebb_replica_context_acquisition_seconds``
  (histogram)
- ``ebb_replica_admission_waits``, ``ebb_replica_admission_rejections`` (counters)
- ``ebb_replica_calls`` (counter, tag outcome: ok, invalid, unavailable, failed)
- per model of a group replica (tags model, group, replica, gpu): ``ebb_model_weights_tier``
  (gauge, tag tier: 1 for the tier its weights are in, else 0), ``ebb_model_weights_bytes``
  (gauge), ``ebb_model_page_ins``, ``ebb_model_page_in_seconds``, ``ebb_model_page_outs``
  (counters; page-in seconds summed, so rate(seconds) / rate(page_ins) is the mean page-in)
- ``ebb_gpu_used_bytes``, ``ebb_gpu_total_bytes``, ``ebb_gpu_pressure`` (gauges, tag gpu)
- ``ebb_coordinator_decisions`` (counter, tag reason)
- ``ebb_autoscaling_decisions`` (counter, tags deployment, reason)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from engine_runtime.memory import MemoryMode
from engine_runtime.stats import StatsSnapshot

from deployments.messages import GpuFigures, ModelTierReport

if TYPE_CHECKING:
    from engine_runtime import BaseEngine

logger = logging.getLogger(__name__)

#: Histogram buckets for one acquisition of context memory, in seconds: a mapped
#: arena takes tens of microseconds, a cudaMalloc or a pool lease milliseconds.
ACQUISITION_BUCKETS_S = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0)
_REPLICA_TAGS = ("model", "replica", "gpu")
CALL_OUTCOMES = ("ok", "invalid", "unavailable", "failed")


class CounterDeltas:
    """Turns cumulative figures into increments, one key at a time.

    Ray counters only go up by positive amounts; a figure that went down (an engine
    replaced, a coordinator restarted) restarts from its new value without counting.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def delta(self, key: str, value: float) -> float:
        last = self._last.get(key)
        self._last[key] = value
        if last is None:
            return value
        return value - last if value > last else 0.0


def _inc(counter, value: float, tags: Mapping[str, str] | None = None) -> None:
    if value > 0:
        counter.inc(value, tags=dict(tags) if tags else None)


class ReplicaMetrics:
    """One replica's metrics; ``update`` is called from its report loop."""

    def __init__(self, model: str, replica_id: str, gpu: str) -> None:
        from ray.util import metrics

        tags = {"model": model, "replica": replica_id, "gpu": gpu}
        self.mode = metrics.Gauge("ebb_replica_mode", "1 for the memory mode the replica is in, 0 for the others.",
                                  tag_keys=_REPLICA_TAGS + ("mode",))
        self.held = metrics.Gauge("ebb_replica_context_bytes_held",
                                  "Bytes of context memory the replica holds now.", tag_keys=_REPLICA_TAGS)
        self.weights = metrics.Gauge("ebb_replica_weights_bytes", "Bytes of the replica's weights.",
                                     tag_keys=_REPLICA_TAGS)
        self.acquisitions = metrics.Counter("ebb_replica_context_acquisitions",
                                            "Acquisitions of context memory (static blocks and dynamic calls).",
                                            tag_keys=_REPLICA_TAGS)
        self.acquisition_s = metrics.Histogram("ebb_replica_context_acquisition_seconds",
                                               "Time one acquisition of context memory took.",
                                               boundaries=list(ACQUISITION_BUCKETS_S), tag_keys=_REPLICA_TAGS)
        self.waits = metrics.Counter("ebb_replica_admission_waits",
                                     "Dynamic calls that waited for the GPU's admission budget.",
                                     tag_keys=_REPLICA_TAGS)
        self.rejections = metrics.Counter("ebb_replica_admission_rejections",
                                          "Calls refused for want of context memory (HTTP 503).",
                                          tag_keys=_REPLICA_TAGS)
        self.calls = metrics.Counter("ebb_replica_calls", "Engine calls by outcome.",
                                     tag_keys=_REPLICA_TAGS + ("outcome",))
        self.pieces = metrics.Counter("ebb_replica_arena_pieces",
                                      "Physical pieces (pool chunks) a call mapped, or found still mapped "
                                      "from the replica's last call (context_pool.keep_mapped).",
                                      tag_keys=_REPLICA_TAGS + ("how",))
        for m in (self.mode, self.held, self.weights, self.acquisitions, self.acquisition_s, self.waits,
                  self.rejections, self.calls, self.pieces):
            m.set_default_tags(tags)
        self._deltas = CounterDeltas()
        self._acquisitions_seen = 0

    def update_from(self, engine: BaseEngine) -> None:
        """Publish the engine's figures now: gauges set, counters moved by their deltas."""
        stats = engine.stats()
        self._acquisitions_seen, durations = engine.acquisition_durations_since(self._acquisitions_seen)
        self.update(engine.mode, stats, durations)
        counts = engine.mapping_counts()
        if counts:
            self.update_mapping(counts)

    def update_mapping(self, counts: Mapping[str, int | bool]) -> None:
        _inc(self.pieces, self._deltas.delta("pieces.mapped", counts["pieces_mapped"]), {"how": "mapped"})
        _inc(self.pieces, self._deltas.delta("pieces.reused", counts["pieces_reused"]), {"how": "reused"})

    def update(self, mode: MemoryMode, stats: StatsSnapshot, new_acquisition_s: Iterable[float]) -> None:
        for m in MemoryMode:
            self.mode.set(1.0 if m is mode else 0.0, tags={"mode": m.value})
        self.held.set(stats.context_bytes_held)
        self.weights.set(stats.weights_bytes)
        _inc(self.acquisitions, self._deltas.delta("acquisitions", stats.acquisitions))
        for seconds in new_acquisition_s:
            self.acquisition_s.observe(seconds)
        _inc(self.waits, self._deltas.delta("waits", stats.admission_waits))
        _inc(self.rejections, self._deltas.delta("rejections", stats.calls_unavailable))
        calls = {"ok": stats.calls_ok, "invalid": stats.calls_invalid, "unavailable": stats.calls_unavailable,
                 "failed": stats.calls_failed}
        for outcome in CALL_OUTCOMES:
            _inc(self.calls, self._deltas.delta(f"calls.{outcome}", calls[outcome]), {"outcome": outcome})


#: The tiers a model's weights may be in (``engine_runtime.WeightsTier`` values).
WEIGHTS_TIERS = ("gpu", "host", "unloaded")
_MODEL_TAGS = ("model", "group", "replica", "gpu")


class ModelTierMetrics:
    """Per-model metrics of one group replica; ``update`` is called from its report loop."""

    def __init__(self, group: str, replica_id: str, gpu: str) -> None:
        from ray.util import metrics

        self.tier = metrics.Gauge("ebb_model_weights_tier", "1 for the tier the model's weights are in "
                                  "(gpu, host, unloaded), 0 for the others.", tag_keys=_MODEL_TAGS + ("tier",))
        self.weights = metrics.Gauge("ebb_model_weights_bytes", "Device bytes of the model's weights when "
                                     "resident.", tag_keys=_MODEL_TAGS)
        self.page_ins = metrics.Counter("ebb_model_page_ins", "Times the model's weights were brought back "
                                        "onto the GPU (host copy or reload).", tag_keys=_MODEL_TAGS)
        self.page_in_s = metrics.Counter("ebb_model_page_in_seconds", "Seconds spent bringing the model's "
                                         "weights back onto the GPU, summed.", tag_keys=_MODEL_TAGS)
        self.page_outs = metrics.Counter("ebb_model_page_outs", "Times the model's weights left the GPU.",
                                         tag_keys=_MODEL_TAGS)
        for m in (self.tier, self.weights, self.page_ins, self.page_in_s, self.page_outs):
            m.set_default_tags({"group": group, "replica": replica_id, "gpu": gpu})
        self._deltas = CounterDeltas()

    def update(self, models: Iterable[ModelTierReport]) -> None:
        for m in models:
            tags = {"model": m.name}
            for tier in WEIGHTS_TIERS:
                self.tier.set(1.0 if tier == m.tier else 0.0, tags={**tags, "tier": tier})
            self.weights.set(m.weights_bytes, tags=tags)
            _inc(self.page_ins, self._deltas.delta(f"{m.name}.page_ins", m.page_ins), tags)
            _inc(self.page_in_s, self._deltas.delta(f"{m.name}.page_in_s", m.page_in_seconds_total), tags)
            _inc(self.page_outs, self._deltas.delta(f"{m.name}.page_outs", m.page_outs), tags)


class CoordinatorMetrics:
    """Per-GPU memory and pressure, and decisions by reason; updated by the coordinator actor."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.used = metrics.Gauge("ebb_gpu_used_bytes", "Bytes in use on the GPU (virtual: summed from reports).",
                                  tag_keys=("gpu",))
        self.total = metrics.Gauge("ebb_gpu_total_bytes", "Bytes the GPU has.", tag_keys=("gpu",))
        self.pressure = metrics.Gauge("ebb_gpu_pressure", "Share of the GPU in use (used / total).",
                                      tag_keys=("gpu",))
        self.decisions = metrics.Counter("ebb_coordinator_decisions",
                                         "Mode switches the coordinator ordered, by reason.", tag_keys=("reason",))
        self._deltas = CounterDeltas()

    def update(self, gpus: Iterable[GpuFigures], decisions_by_reason: Mapping[str, int]) -> None:
        """Set the per-GPU gauges and move the decision counters (cumulative counts by reason)."""
        for gpu in gpus:
            tags = {"gpu": gpu.uuid}
            self.used.set(gpu.used_bytes, tags=tags)
            self.total.set(gpu.total_bytes, tags=tags)
            self.pressure.set(gpu.used_bytes / gpu.total_bytes, tags=tags)
        for reason, count in decisions_by_reason.items():
            _inc(self.decisions, self._deltas.delta(reason, count), {"reason": reason})


class AutoscalingMetrics:
    """The memory-aware autoscaling policy's decisions, by deployment and reason."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.decisions = metrics.Counter("ebb_autoscaling_decisions",
                                         "Decisions of Ebb's autoscaling policy, by reason.",
                                         tag_keys=("deployment", "reason"))

    def record(self, deployment: str, reason: str) -> None:
        self.decisions.inc(1, tags={"deployment": deployment, "reason": reason})
