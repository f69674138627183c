"""The messages between Ebb's actors, as plain dataclasses (pickled by Ray as they are).

A replica sends a ``ReplicaReport``; the coordinator answers with a ``Directive``.
The coordinator hands its metrics ``GpuFigures``. Neither side imports the other:
both import these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_runtime.pressure import GpuPressure

__all__ = ["Directive", "GpuFigures", "ModelTierReport", "ReplicaReport"]


@dataclass
class ModelTierReport:
    """One model of a group replica (``engine_runtime.ModelTierStatus`` as plain data)."""

    name: str
    #: "gpu", "host" or "unloaded".
    tier: str
    weights_bytes: int
    #: ``time.time()`` of the last call on the replica's clock; None before any.
    last_used_s: float | None
    #: Seconds since the last call (since the replica started, if none), on the replica's clock.
    idle_s: float
    page_ins: int
    page_in_seconds_total: float
    page_outs: int
    calls: int


@dataclass
class ReplicaReport:
    """What a replica tells the coordinator; plain data."""

    replica_id: str
    model: str
    pid: int
    node_id: str
    gpu: str
    virtual: bool
    pin: str
    mode: str
    mechanism: str
    weights_bytes: int
    #: Context bytes the replica holds when static (its largest call).
    context_bytes: int
    #: Bytes of context memory held right now (static block or calls in flight).
    held_bytes: int
    request_rate_per_s: float
    latency_static_s: float | None
    latency_dynamic_s: float | None
    in_flight: int
    loaded: bool
    #: A fresh NVML reading of the replica's card; None for virtual GPUs or when NVML failed.
    reading: GpuPressure | None = None
    #: Why there is no reading on a real GPU (NVML failing).
    reading_error: str | None = None
    #: "in use" when the replica leases context memory from its GPU's pool, else why not.
    pool: str = "not used"
    #: What the GPU's pool holds now (its lease table), read by a replica using it; else None.
    pool_bytes: int | None = None
    #: The pool's chunk size, and the most it may hold (``context_pool.max_bytes``; None: no cap).
    pool_chunk_bytes: int | None = None
    pool_max_bytes: int | None = None
    #: This process's NVML memory after CUDA initialised, before any engine; None without a GPU.
    floor_bytes: int | None = None
    #: The group a group replica serves (``model`` is the group's name too); None otherwise.
    group: str | None = None
    #: A group replica's models, their weights tiers and use; None otherwise.
    models: list[ModelTierReport] | None = None
    #: Whether the coordinator may page out this group's cold weights, and when a model is cold.
    page_out_under_pressure: bool = False
    cold_after_s: float | None = None


@dataclass
class Directive:
    """The coordinator's answer: the mode to be in and the GPU's admission budget."""

    mode: str | None
    budget_bytes: int | None
    reason: str = ""
    #: What the GPU's context pool should hold (``deployments.policy.pool_target_bytes``);
    #: None where the replica has no pool or the GPU is unknown.
    pool_target_bytes: int | None = None
    #: Bytes another replica may take on this GPU below its high watermark (for the
    #: autoscaling policy, ``deployments.autoscaling``); None where the GPU is unknown.
    room_bytes: int | None = None
    #: Static context bytes the coordinator could free here by moving unpinned replicas to dynamic.
    reclaimable_bytes: int = 0
    #: Models whose weights a group replica should page out (still cold when it acts), and why.
    page_out: list[str] = field(default_factory=list)
    page_out_reason: str = ""


@dataclass(frozen=True)
class GpuFigures:
    """One GPU as measured (switches in flight not counted), for the per-GPU gauges."""

    uuid: str
    used_bytes: int
    total_bytes: int
