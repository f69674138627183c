"""A group replica's figures as one replica's: its engines' stats summed, its models'
tiers as plain report data. Pure functions over what ``EngineGroup`` and the engines
return, so the coordinator client, the status view and the metrics read one figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from deployments.messages import ModelTierReport
from engine_runtime import ModelTierStatus, StatsSnapshot

#: Counters and byte figures that add up across the engines of one process.
_SUMMED = ("weights_bytes", "context_bytes_held", "peak_context_bytes", "last_context_bytes", "acquisitions",
           "acquisition_total_s", "calls_ok", "calls_invalid", "calls_unavailable", "calls_failed",
           "calls_in_flight", "request_rate_per_s", "admission_waits")


def aggregate_stats(snapshots: Sequence[StatsSnapshot], resident_weights_bytes: int) -> StatsSnapshot:
    """One replica's stats from its engines'. ``weights_bytes`` is what is on the GPU now
    (the group's resident weights), not every model's. Latency percentiles are the
    request-rate-weighted mean of the engines' (the slowest p99), per mode."""
    sums = {k: sum(getattr(s, k) for s in snapshots) for k in _SUMMED}
    sums["weights_bytes"] = int(resident_weights_bytes)
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for mode in {m for s in snapshots for m in s.latency_p50_s}:
        measured = [s for s in snapshots if mode in s.latency_p50_s]
        weight = sum(max(s.request_rate_per_s, 1e-9) for s in measured)
        p50[mode] = sum(s.latency_p50_s[mode] * max(s.request_rate_per_s, 1e-9) for s in measured) / weight
        p99[mode] = max(s.latency_p99_s.get(mode, 0.0) for s in measured)
    return StatsSnapshot(
        acquisition_p50_s=max((s.acquisition_p50_s for s in snapshots), default=0.0),
        acquisition_p99_s=max((s.acquisition_p99_s for s in snapshots), default=0.0),
        latency_p50_s=p50, latency_p99_s=p99, **sums)


def tier_reports(status: Iterable[ModelTierStatus], now_s: float, started_s: float) -> list[ModelTierReport]:
    """The group's models for the coordinator: tier as text, and idle seconds on the
    replica's own clock (since it started, for a model never called)."""
    return [ModelTierReport(name=m.name, tier=m.tier.value, weights_bytes=int(m.weights_bytes),
                            last_used_s=m.last_used_s,
                            idle_s=max(0.0, now_s - (m.last_used_s if m.last_used_s is not None else started_s)),
                            page_ins=int(m.page_ins), page_in_seconds_total=float(m.page_in_seconds_total),
                            page_outs=int(m.page_outs), calls=int(m.calls))
            for m in status]
