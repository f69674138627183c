"""What a replica tells the coordinator and what it does with the answer: pure functions.

:func:`make_report` turns plain figures (who the replica is, what its engine holds
(:func:`engine_figures`), its GPU's reading, its pool) into a ``ReplicaReport``; :func:`directive_actions` turns
a ``Directive`` and the replica's state into the :class:`Actions` to take. The thread
that talks to the coordinator (``deployments.coordinator_client``) only gathers the
figures, calls these, and acts; both are tested with tables of cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployments.gpu_identity import GpuIdentity
from deployments.messages import Directive, ReplicaReport
from engine_runtime.pressure import GpuPressure
from engine_runtime.stats import StatsSnapshot

__all__ = ["Actions", "ReplicaIdentity", "directive_actions", "engine_figures", "make_report"]


@dataclass(frozen=True)
class ReplicaIdentity:
    """Who the replica is and what it serves: fixed for its life."""

    replica_id: str
    model: str
    gpu: GpuIdentity
    weights_bytes: int
    #: The status view's ``pool`` words (``memory.ContextPlan.pool_status``).
    pool_status: str = "not used"
    #: ``context_pool.max_bytes`` (None: no cap).
    pool_max_bytes: int | None = None
    #: The process's memory after CUDA initialised, before any engine (``replica.setup_cuda_process``).
    floor_bytes: int | None = None


def engine_figures(*, mode: str, mechanism: str, loaded: bool, stats: StatsSnapshot,
                   largest_context_bytes: int | None) -> dict[str, Any]:
    """The report's fields about the engine. ``context_bytes``, what the replica holds
    when static, is its largest call where the engine is loaded (``largest_context_bytes``),
    else the most it has held so far."""
    return {
        "mode": mode, "mechanism": mechanism, "loaded": loaded,
        "context_bytes": largest_context_bytes if loaded and largest_context_bytes is not None
        else stats.peak_context_bytes,
        "held_bytes": stats.context_bytes_held, "request_rate_per_s": stats.request_rate_per_s,
        "latency_static_s": stats.latency_p50_s.get("static"), "latency_dynamic_s": stats.latency_p50_s.get("dynamic"),
        "in_flight": stats.calls_in_flight,
    }


def make_report(identity: ReplicaIdentity, engine: Mapping[str, Any], *, pid: int, pin: str,
                reading: GpuPressure | None, reading_error: str | None, fault_injected: bool = False,
                pool_bytes: int | None = None, pool_chunk_bytes: int | None = None,
                group: Mapping[str, Any] | None = None) -> ReplicaReport:
    """The report for these figures. ``fault_injected``: the replica pretends its GPU is a
    real card whose NVML reading fails (tests); ``pool_bytes`` is None without a pool.
    ``engine``: the engine's fields (:func:`engine_figures`). ``group``: a group replica's
    fields (``group``, ``models``, ``page_out_under_pressure``, ``cold_after_s`` and its
    resident ``weights_bytes``, which vary, unlike a single model's)."""
    pooled = pool_bytes is not None
    fields: dict[str, Any] = dict(
        replica_id=identity.replica_id, model=identity.model, pid=pid, node_id=identity.gpu.node_id,
        gpu=identity.gpu.uuid, virtual=identity.gpu.virtual and not fault_injected, pin=pin,
        weights_bytes=identity.weights_bytes, **engine, reading=reading, reading_error=reading_error, pool=identity.pool_status,
        pool_bytes=pool_bytes if pooled else None, pool_chunk_bytes=pool_chunk_bytes if pooled else None,
        pool_max_bytes=identity.pool_max_bytes if pooled else None, floor_bytes=identity.floor_bytes,
    )
    fields.update(group or {})
    return ReplicaReport(**fields)


@dataclass(frozen=True)
class Actions:
    """What a replica does with a directive, in this order."""

    #: Set the GPU's admission budget to this (None: leave it).
    budget_bytes: int | None = None
    #: Resize the GPU's pool to this many chunks (None: leave it), before any switch: a
    #: replica told to go static leases from a pool sized for it.
    pool_chunks: int | None = None
    #: Switch to this mode after the call in flight (None: stay).
    switch_to: str | None = None
    #: Models whose weights a group replica pages out (each only if still cold), before any switch.
    page_out: tuple[str, ...] = ()


def directive_actions(directive: Directive, *, pin: str, mode: str, pool_chunk_bytes: int | None = None,
                      pool_capacity_chunks: int | None = None) -> Actions:
    """The actions for ``directive``. A pinned replica keeps its pin whatever a (possibly
    stale) directive says. Every replica on a pool gets the same target and may act on
    it: a resize is absolute and idempotent, and asked for only when the capacity differs."""
    pool_chunks = None
    if pool_chunk_bytes and directive.pool_target_bytes is not None:
        wanted = math.ceil(int(directive.pool_target_bytes) / pool_chunk_bytes)
        pool_chunks = wanted if wanted != pool_capacity_chunks else None
    target = directive.mode if pin == "auto" else pin
    return Actions(
        budget_bytes=None if directive.budget_bytes is None else int(directive.budget_bytes),
        pool_chunks=pool_chunks,
        switch_to=target if target and target != mode else None,
        page_out=tuple(directive.page_out),
    )
