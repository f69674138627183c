"""The coordinator: one named Ray actor that decides every replica's memory mode.

Replicas report (``ReplicaReport``) every half poll interval, carrying their figures
and, on real GPUs, a fresh NVML reading of their card taken on their own node. The
coordinator keeps the latest view per replica and per GPU, runs the pure policy
(``deployments.policy.decide``) for that GPU on each report, and answers with a
``Directive``: the mode the replica should be in and its GPU's admission budget.
A new directive therefore reaches every replica within one poll interval.

Decisions see *projected* use: a switch the coordinator has ordered but the replica
has not yet reported done is counted as if done, so that a second report arriving
before the first replica obeys does not switch more replicas than needed (or send
two replicas static into room for one). The admission budget is more careful on a
real GPU: there a switch to dynamic counts only once an NVML reading shows the
bytes freed, because a reading taken between the free and the replica's next report
would otherwise count them twice and the budget would promise memory that is not
there. (Virtual GPUs are summed from the same reports as the modes: exact both ways.)

Restart safety: the actor is detached, restarted on failure and holds no state that
replicas cannot resend; after a restart, the next reports rebuild its view and
replicas keep serving in their current mode meanwhile. Budget held by a replica
that died is reclaimed by the shared budget itself (per-pid holders).

Lifetime: detached, so no replica owns it (one stopping must not take it down), yet
it goes with its application: once no replica has reported for ``orphan_exit_s``
(``serve shutdown``, the app deleted or scaled to zero) it kills itself without
restart (:func:`orphaned`). A replica that starts later creates a new one.

``CoordinatorState`` is plain Python (testable without Ray); ``Coordinator`` only
wraps it in an actor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from deployments.config import CoordinatorConfig
from deployments.messages import Directive, GpuFigures, ModelTierReport, ReplicaReport
from deployments.policy import (
    ColdModel,
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
from engine_runtime.units import MiB
from engine_runtime.pressure import GpuPressure

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "ebb-coordinator"


@dataclass
class _Replica:
    report: ReplicaReport
    last_seen_s: float
    desired_mode: str
    last_switch_s: float | None = None
    last_decision: str = ""
    #: Models ordered paged out whose weights the replica still reports on the GPU.
    page_out: list[str] = field(default_factory=list)
    page_out_reason: str = ""


@dataclass
class _Gpu:
    uuid: str
    virtual: bool
    reading: GpuPressure | None = None
    read_at_s: float = 0.0
    known: bool = True
    external_bytes: int = 0
    budget_bytes: int | None = None
    last_error: str | None = None
    #: The context pool as last reported (bytes held, chunk size, cap) and its target.
    pool_bytes: int | None = None
    pool_chunk_bytes: int | None = None
    pool_max_bytes: int | None = None
    pool_target_bytes: int | None = None
    #: Bytes held for replicas the autoscaler is about to add (see ``reserve_room``).
    reserved_bytes: int = 0
    reserved_until_s: float = 0.0


def _cold_on_gpu(report: ReplicaReport) -> list[ModelTierReport]:
    """A group replica's models the policy may page out: on the GPU, idle for its group's
    ``cold_after_s``, where the group allows it."""
    if not report.models or not report.page_out_under_pressure or report.cold_after_s is None:
        return []
    return [m for m in report.models if m.tier == "gpu" and m.idle_s >= report.cold_after_s]


def policy_config(cfg: CoordinatorConfig) -> PolicyConfig:
    return PolicyConfig(high_watermark=cfg.high_watermark, low_watermark=cfg.low_watermark, target=cfg.target,
                        min_dwell_s=cfg.min_dwell_s, poll_interval_s=cfg.poll_interval_s,
                        admission_deadline_s=cfg.admission_deadline_s)


class CoordinatorState:
    """The coordinator's whole logic, without Ray: observe reports, decide, explain."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.policy = policy_config(cfg)
        # A virtual GPU's use is exact bookkeeping: no CUDA contexts, allocator slack or
        # reading lag for the headroom to absorb, and on a small virtual device it would
        # leave no target at all.
        self.virtual_policy = replace(self.policy, headroom_bytes=0)
        self.replicas: dict[str, _Replica] = {}
        self.gpus: dict[str, _Gpu] = {}
        self.history: deque[dict] = deque(maxlen=cfg.history_size)
        self.decisions_by_reason: dict[str, int] = {}
        self.started_s = time.time()
        # A replica silent for this long is presumed dead and leaves the view.
        self.expiry_s = max(3 * cfg.poll_interval_s, 2.0)

    # -- inputs -----------------------------------------------------------------

    def observe(self, report: ReplicaReport, now_s: float) -> Directive:
        # Expire first: a replica silent past the expiry comes back as new, whether or
        # not anything looked at the view meanwhile.
        self._expire(now_s)
        rep = self.replicas.get(report.replica_id)
        new = rep is None
        if rep is None:
            # New, or known before a coordinator restart: trust the replica's own mode.
            rep = _Replica(report, now_s, report.mode)
            self.replicas[report.replica_id] = rep
            logger.info("replica %s (%s) registered on %s in %s mode", report.replica_id, report.model,
                        report.gpu, report.mode)
        rep.report = report
        rep.last_seen_s = now_s
        if rep.page_out:
            # Done once off the GPU; dropped once used again (no longer cold: the replica would refuse).
            still = {m.name for m in _cold_on_gpu(report)}
            rep.page_out = [n for n in rep.page_out if n in still]
        gpu = self.gpus.setdefault(report.gpu, _Gpu(report.gpu, report.virtual))
        if gpu.reserved_bytes and (new or now_s >= gpu.reserved_until_s):
            # The replica the room was held for has arrived, or is not coming.
            gpu.reserved_bytes = 0
        if report.reading is not None:
            gpu.reading, gpu.read_at_s, gpu.known, gpu.last_error = report.reading, now_s, True, None
        elif not report.virtual:
            # NVML failed where the replica runs: hold modes, never go static blind.
            gpu.known, gpu.last_error = False, report.reading_error
        if report.pool_bytes is not None:
            gpu.pool_bytes, gpu.pool_chunk_bytes = report.pool_bytes, report.pool_chunk_bytes
            gpu.pool_max_bytes = report.pool_max_bytes
        self._decide_gpu(report.gpu, now_s)
        pool_target = gpu.pool_target_bytes if report.pool_bytes is not None else None
        return Directive(rep.desired_mode, gpu.budget_bytes, rep.last_decision, pool_target,
                         self.room_bytes(report.gpu), self.reclaimable_bytes(report.gpu),
                         list(rep.page_out), rep.page_out_reason if rep.page_out else "")

    def reserve_room(self, replica_id: str, nbytes: int, now_s: float, ttl_s: float) -> bool:
        """Count ``nbytes`` as used on ``replica_id``'s GPU until a new replica registers
        there or ``ttl_s`` passes: room the autoscaler holds for replicas it is about to
        add, which the policy makes by moving static replicas to dynamic. False when
        the replica is unknown (expired, or the coordinator restarted)."""
        rep = self.replicas.get(replica_id)
        if rep is None:
            return False
        gpu = self.gpus[rep.report.gpu]
        gpu.reserved_bytes, gpu.reserved_until_s = max(0, int(nbytes)), now_s + ttl_s
        logger.info("holding %.0f MiB on %s for replicas the autoscaler adds", nbytes / MiB, gpu.uuid)
        self._decide_gpu(gpu.uuid, now_s)
        return True

    def room_bytes(self, uuid: str) -> int | None:
        """Bytes a newcomer may take on the GPU before it passes its high watermark
        (switches ordered counted as done, reservations not); None where unknown."""
        view = self.gpu_view(uuid)
        if not view.known or not view.total_bytes:
            return None
        used = view.used_bytes - self.gpus[uuid].reserved_bytes
        return max(0, int(self.policy_for(uuid).high_watermark * view.total_bytes) - used)

    def reclaimable_bytes(self, uuid: str) -> int:
        """Static context the policy may free on the GPU: unpinned replicas told to be static."""
        return sum(rep.report.context_bytes for rep in self.replicas.values()
                   if rep.report.gpu == uuid and rep.report.pin == Pin.AUTO.value
                   and rep.desired_mode == MemoryMode.STATIC.value)

    def inject_external_bytes(self, gpu_uuid: str, nbytes: int) -> None:
        """Pretend another process holds ``nbytes`` on a *virtual* GPU (tests, demos)."""
        gpu = self.gpus.setdefault(gpu_uuid, _Gpu(gpu_uuid, True))
        gpu.external_bytes = int(nbytes)

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    # -- decisions ----------------------------------------------------------------

    def _expire(self, now_s: float) -> None:
        for rid, rep in list(self.replicas.items()):
            if now_s - rep.last_seen_s > self.expiry_s:
                logger.info("replica %s silent for %.1f s: presumed dead", rid, now_s - rep.last_seen_s)
                del self.replicas[rid]

    def policy_for(self, uuid: str) -> PolicyConfig:
        gpu = self.gpus.get(uuid)
        return self.virtual_policy if gpu is not None and gpu.virtual else self.policy

    def measured_view(self, uuid: str) -> GpuView:
        """The GPU as last read (virtual: summed from the reports), switches in flight not counted."""
        gpu = self.gpus[uuid]
        if gpu.virtual:
            members = [r.report for r in self.replicas.values() if r.report.gpu == uuid]
            used = gpu.external_bytes + sum(r.weights_bytes + r.held_bytes for r in members)
            return GpuView(uuid=uuid, total_bytes=self.cfg.virtual_gpu_memory_bytes, used_bytes=used)
        if not gpu.known or gpu.reading is None:
            return GpuView(uuid=uuid, total_bytes=0, used_bytes=0, known=False)
        return GpuView(uuid=uuid, total_bytes=gpu.reading.total_bytes, used_bytes=gpu.reading.used_bytes)

    def pending_bytes(self, uuid: str, *, count_frees: bool = True) -> int:
        """Change in use that ordered but unconfirmed switches will bring (see the module docstring)."""
        delta = 0
        for rep in self.replicas.values():
            r = rep.report
            if r.gpu == uuid and rep.page_out and count_frees:
                ordered = set(rep.page_out)
                delta -= sum(m.weights_bytes for m in r.models or () if m.name in ordered and m.tier == "gpu")
            if r.gpu != uuid or rep.desired_mode == r.mode:
                continue
            if rep.desired_mode == MemoryMode.STATIC.value:
                delta += r.context_bytes
            elif count_frees:
                delta -= r.held_bytes
        return delta

    def gpu_view(self, uuid: str, *, count_frees: bool = True) -> GpuView:
        """The GPU as the policy sees it: measured use plus switches ordered but not yet done."""
        view = self.measured_view(uuid)
        if not view.known:
            return view
        pending = self.pending_bytes(uuid, count_frees=count_frees) + self.gpus[uuid].reserved_bytes
        return replace(view, used_bytes=max(0, view.used_bytes + pending))

    def replica_views(self, uuid: str) -> list[ReplicaView]:
        views = []
        for rep in self.replicas.values():
            r = rep.report
            if r.gpu != uuid:
                continue
            views.append(ReplicaView(
                replica_id=r.replica_id, gpu_uuid=uuid, model=r.model, mode=MemoryMode(rep.desired_mode),
                pin=Pin(r.pin), weights_bytes=r.weights_bytes, context_bytes=r.context_bytes,
                request_rate_per_s=r.request_rate_per_s, latency_static_s=r.latency_static_s,
                latency_dynamic_s=r.latency_dynamic_s, in_flight=r.in_flight,
                last_switch_s=rep.last_switch_s, alive=True,
                # Bytes of dynamic calls in flight; a static replica's held bytes are its block.
                context_bytes_held=r.held_bytes if r.mode == MemoryMode.DYNAMIC.value else 0,
                # Models already ordered out are counted as gone (pending_bytes), not again.
                cold_models=tuple(ColdModel(m.name, m.weights_bytes, m.idle_s) for m in _cold_on_gpu(r)
                                  if m.name not in rep.page_out),
            ))
        return views

    def _decide_gpu(self, uuid: str, now_s: float) -> list[Decision]:
        policy = self.policy_for(uuid)
        decisions = decide([self.gpu_view(uuid)], self.replica_views(uuid), policy, now_s)
        for d in decisions:
            rep = self.replicas.get(d.replica_id)
            if rep is None:
                continue
            if d.new_mode is None:  # a page-out: the mode and its dwell stay as they are
                rep.page_out = list(dict.fromkeys([*rep.page_out, *d.page_out]))
                rep.page_out_reason = d.reason
            else:
                rep.desired_mode = d.new_mode.value
                rep.last_switch_s = now_s
            rep.last_decision = d.reason
            entry = {"time_s": time.time(), "replica_id": d.replica_id, "model": rep.report.model, "gpu": uuid,
                     "new_mode": None if d.new_mode is None else d.new_mode.value, "page_out": list(d.page_out),
                     "reason": d.reason, "bytes_delta": d.bytes_delta,
                     "pressure_before": d.pressure_before, "projected_after": d.projected_after}
            self.history.append(entry)
            key = d.reason.split(":", 1)[0]
            self.decisions_by_reason[key] = self.decisions_by_reason.get(key, 0) + 1
            logger.info("%s %s (%s) on %s: %s (%+.0f MiB)",
                        "page out" if d.new_mode is None else f"switch to {d.new_mode.value}", d.replica_id,
                        rep.report.model, uuid, d.reason, d.bytes_delta / MiB)
        # The budget follows the decisions just taken: a replica told to go dynamic gets
        # a budget that already counts the static bytes it gives up (virtual GPUs).
        budget_view = self.gpu_view(uuid, count_frees=self.gpus[uuid].virtual)
        capacity = admission_capacity(budget_view, self.replica_views(uuid), policy)
        if capacity is not None:
            self.gpus[uuid].budget_bytes = capacity
        self._size_pool(uuid)
        return decisions

    def _size_pool(self, uuid: str) -> None:
        """The pool's target from the measured card (the pool's bytes are in NVML's ``used``)
        and the modes just decided (a replica told to go dynamic gives up its standing lease)."""
        gpu = self.gpus[uuid]
        if gpu.pool_bytes is None or not gpu.pool_chunk_bytes:
            return
        pooled = {r.report.replica_id for r in self.replicas.values()
                  if r.report.gpu == uuid and r.report.pool_bytes is not None}
        if not pooled:
            gpu.pool_bytes = gpu.pool_target_bytes = None  # the last replica on the pool has gone
            return
        target = pool_target_bytes(self.measured_view(uuid), gpu.pool_bytes, self.policy_for(uuid),
                                   gpu.pool_max_bytes, chunk_bytes=gpu.pool_chunk_bytes,
                                   replicas=[v for v in self.replica_views(uuid) if v.replica_id in pooled])
        if target is not None and target != gpu.pool_target_bytes:
            logger.info("pool on %s: target %.0f MiB (holds %.0f MiB)", uuid, target / MiB, gpu.pool_bytes / MiB)
        if target is not None:
            gpu.pool_target_bytes = target

    # -- output -----------------------------------------------------------------

    def gpu_figures(self) -> list[GpuFigures]:
        """Every GPU whose size is known, as measured: what the per-GPU gauges show."""
        figures = []
        for uuid in list(self.gpus):
            view = self.measured_view(uuid)
            if view.known and view.total_bytes:
                figures.append(GpuFigures(uuid, view.used_bytes, view.total_bytes))
        return figures

    def status(self, now_s: float) -> dict[str, Any]:
        self._expire(now_s)
        gpus = []
        for uuid, gpu in sorted(self.gpus.items()):
            view = self.gpu_view(uuid)
            measured = self.measured_view(uuid)
            replicas = []
            for rep in self.replicas.values():
                r = rep.report
                if r.gpu != uuid:
                    continue
                replicas.append({
                    "replica_id": r.replica_id, "model": r.model, "pid": r.pid, "node_id": r.node_id,
                    "mode": r.mode, "desired_mode": rep.desired_mode, "pin": r.pin, "mechanism": r.mechanism,
                    "weights_bytes": r.weights_bytes, "context_bytes": r.context_bytes,
                    "held_bytes": r.held_bytes, "request_rate_per_s": r.request_rate_per_s,
                    "latency_static_s": r.latency_static_s, "latency_dynamic_s": r.latency_dynamic_s,
                    "in_flight": r.in_flight, "loaded": r.loaded, "last_decision": rep.last_decision,
                    "pool": r.pool,
                    "floor_bytes": r.floor_bytes,
                    "group": r.group,
                    "models": None if r.models is None else [asdict(m) for m in r.models],
                    "page_out_pending": list(rep.page_out),
                    "last_seen_s_ago": round(now_s - rep.last_seen_s, 3),
                })
            gpus.append({
                "gpu": uuid, "virtual": gpu.virtual, "known": view.known,
                "total_bytes": view.total_bytes, "used_bytes": measured.used_bytes,
                "projected_used_bytes": view.used_bytes,
                "pressure": (measured.used_bytes / view.total_bytes) if view.known and view.total_bytes else None,
                "external_bytes": gpu.external_bytes, "budget_bytes": gpu.budget_bytes,
                "pool_bytes": gpu.pool_bytes, "pool_target_bytes": gpu.pool_target_bytes,
                "pool_max_bytes": gpu.pool_max_bytes, "reserved_bytes": gpu.reserved_bytes,
                "last_error": gpu.last_error, "replicas": sorted(replicas, key=lambda x: x["replica_id"]),
            })
        return {"policy": asdict(self.policy), "gpus": gpus, "history": list(self.history),
                "decisions_by_reason": dict(self.decisions_by_reason), "started_s": self.started_s}


def orphaned(last_report_s: float | None, now_s: float, orphan_exit_s: float) -> bool:
    """Whether the coordinator has outlived its application: replicas had reported,
    and none has for ``orphan_exit_s``. Before the first report it waits (replicas
    may take minutes to load)."""
    return last_report_s is not None and now_s - last_report_s >= orphan_exit_s


class Coordinator:
    """The actor body (decorated with ``ray.remote`` by :func:`get_or_create`)."""

    def __init__(self, cfg: dict) -> None:
        self._state = CoordinatorState(CoordinatorConfig.model_validate(cfg))
        self._lock = threading.Lock()
        from deployments.metrics import CoordinatorMetrics

        self._metrics = CoordinatorMetrics()
        self._metrics_at_s = 0.0
        self._last_report_s: float | None = None
        threading.Thread(target=self._exit_when_orphaned, name="ebb-coordinator-orphan", daemon=True).start()

    def _exit_when_orphaned(self) -> None:
        import ray

        limit_s = self._state.cfg.orphan_exit_s
        while True:
            time.sleep(min(limit_s / 4, 5.0))
            with self._lock:
                last = self._last_report_s
            if orphaned(last, time.monotonic(), limit_s):
                logger.info("coordinator: no replica reported for %.0f s; its application is gone, exiting",
                            limit_s)
                # An actor method is not running here, so exit_actor() does not apply;
                # killing itself without restart is what ends a detached actor for good.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    def report(self, report: ReplicaReport) -> Directive:
        with self._lock:
            now_s = time.monotonic()
            self._last_report_s = now_s
            decided_before = sum(self._state.decisions_by_reason.values())
            directive = self._state.observe(report, now_s)
            # Every report can decide; the per-GPU gauges need no more than one update a poll,
            # but a report that decided publishes at once, before its directive reaches the
            # replica: the decision counter must not trail the switch it ordered (a skipped
            # update waited for a later report, and the re-report right after the switch
            # falls inside the same poll).
            decided = sum(self._state.decisions_by_reason.values()) != decided_before
            if decided or now_s - self._metrics_at_s >= self._state.cfg.poll_interval_s:
                self._metrics_at_s = now_s
                self._metrics.update(self._state.gpu_figures(), dict(self._state.decisions_by_reason))
            return directive

    def reserve_room(self, replica_id: str, nbytes: int, ttl_s: float) -> bool:
        with self._lock:
            return self._state.reserve_room(replica_id, nbytes, time.monotonic(), ttl_s)

    def forget(self, replica_id: str) -> None:
        with self._lock:
            self._state.forget(replica_id)

    def inject_external_bytes(self, gpu_uuid: str, nbytes: int) -> None:
        with self._lock:
            self._state.inject_external_bytes(gpu_uuid, nbytes)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self._state.status(time.monotonic())

    def ping(self) -> float:
        return self._state.started_s


def get_or_create(cfg: CoordinatorConfig):
    """The coordinator's handle, creating the detached, self-restarting actor if needed."""
    import ray

    actor_cls = ray.remote(Coordinator)
    return actor_cls.options(
        name=COORDINATOR_NAME, namespace=cfg.namespace, get_if_exists=True, lifetime="detached",
        max_restarts=-1, max_task_retries=3, num_cpus=0, max_concurrency=16,
    ).remote(cfg.model_dump())


def get_existing(namespace: str = "ebb"):
    """The running coordinator's handle (for the status command), or raise ValueError."""
    import ray

    return ray.get_actor(COORDINATOR_NAME, namespace=namespace)
