"""The replica's side of the coordinator: report, then obey the directive.

A daemon thread per replica sends a ``ReplicaReport`` every half poll interval and
applies the answer: switch mode (after the call in flight), set the GPU's shared
admission budget, and resize the GPU's context pool where the replica uses one. After a switch it reports again at once, so the coordinator sees
the bytes freed or taken (and sets the budget from them) without waiting a turn.
If the coordinator is unreachable (restarting, killed), the replica keeps serving
in its current mode and tries again; nothing on the request path waits for the
coordinator.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from deployments.config import CoordinatorConfig
from deployments.coordinator import ReplicaReport, get_or_create
from deployments.gpu_identity import GpuIdentity
from engine_runtime.memory import MemoryMode, SharedBudget
from engine_runtime.units import MiB
from engine_runtime.memory.pool import PoolUnavailableError

if TYPE_CHECKING:
    from deployments.model import ModelDeployment

logger = logging.getLogger(__name__)

#: Fault injection, off unless set. A replica started with this environment variable
#: reports its GPU as a real card whose NVML reading fails, with the variable's value
#: as the error, so that the coordinator's "GPU unknown" rule can be exercised on a
#: host without a GPU (tests/integration/test_faults.py sets it through the
#: deployment's ``runtime_env``). Read once, when the replica starts; never set it in
#: production: the coordinator then holds that GPU's modes and budget for good.
FAULT_NVML_ERROR_ENV = "EBB_FAULT_NVML_ERROR"


def admission_for(gpu: GpuIdentity) -> SharedBudget:
    """The node-local byte budget every replica on this GPU shares.

    Unbounded until the coordinator sets a capacity from what the card has free.
    """
    return SharedBudget(key=gpu.uuid)


class CoordinatorClient:
    def __init__(self, replica: ModelDeployment, cfg: CoordinatorConfig) -> None:
        self.replica = replica
        self.cfg = cfg
        self.interval_s = cfg.poll_interval_s / 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ebb-coordinator-client", daemon=True)
        self._handle = None
        self._probe = None
        self._last_ok_s: float | None = None
        self._last_error: str | None = None
        self._last_directive: Any = None
        self._last_report: ReplicaReport | None = None
        self._last_metrics_error: str | None = None
        self._last_pool_error: str | None = None
        self._fault_nvml_error = os.environ.get(FAULT_NVML_ERROR_ENV) or None
        if self._fault_nvml_error is not None:
            logger.warning("fault injection on (%s): NVML readings of %s fail with %r", FAULT_NVML_ERROR_ENV,
                           replica.gpu.uuid, self._fault_nvml_error)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval_s + 1)

    def last_contact(self) -> dict:
        return {
            "seconds_ago": None if self._last_ok_s is None else round(time.monotonic() - self._last_ok_s, 3),
            "error": self._last_error,
            "directive": None if self._last_directive is None else vars(self._last_directive),
            "pool_error": self._last_pool_error,
        }

    @property
    def last_report(self) -> ReplicaReport | None:
        return self._last_report

    @property
    def last_directive(self) -> Any:
        return self._last_directive

    # -- loop -------------------------------------------------------------------

    def _publish_metrics(self) -> None:
        try:
            self.replica.metrics.update_from(self.replica.engine)
            self._last_metrics_error = None
        except Exception as err:  # noqa: BLE001 - metrics must never stop the reports
            if self._last_metrics_error != str(err):
                logger.warning("metrics not published: %s", err)
            self._last_metrics_error = str(err)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._publish_metrics()
            switched = False
            try:
                switched = self.report_once()
            except Exception as err:  # noqa: BLE001 - the coordinator may be restarting; keep serving
                if self._last_error != str(err):
                    logger.warning("coordinator unreachable (%s); keeping mode %s", err, self.current_mode())
                self._last_error = str(err)
                self._handle = None
            if not switched:
                self._stop.wait(self.interval_s)

    def report_once(self) -> bool:
        """Report, apply the directive; return whether the replica switched mode."""
        import ray

        if self._handle is None:
            self._handle = get_or_create(self.cfg)
        report = self.build_report()
        self._last_report = report
        directive = ray.get(self._handle.report.remote(report), timeout=max(5 * self.interval_s, 2.0))
        self._last_ok_s = time.monotonic()
        self._last_error = None
        self._last_directive = directive
        return self.apply(directive)

    def build_report(self) -> ReplicaReport:
        rep = self.replica
        engine = rep.engine
        stats = engine.stats()
        desc = rep.desc
        reading, reading_error = self._read_gpu()
        return ReplicaReport(
            replica_id=rep.replica_id, model=rep.model.name, pid=os.getpid(), node_id=rep.gpu.node_id,
            gpu=rep.gpu.uuid, virtual=rep.gpu.virtual and self._fault_nvml_error is None, pin=rep.pin,
            mode=engine.mode.value,
            mechanism=engine.mechanism.value, weights_bytes=desc.weights_bytes,
            context_bytes=engine.context_bytes(desc.max_shapes()) if engine.loaded else stats.peak_context_bytes,
            held_bytes=stats.context_bytes_held, request_rate_per_s=stats.request_rate_per_s,
            latency_static_s=stats.latency_p50_s.get("static"), latency_dynamic_s=stats.latency_p50_s.get("dynamic"),
            in_flight=stats.calls_in_flight, loaded=engine.loaded, reading=reading, reading_error=reading_error,
            floor_bytes=rep.process.floor_bytes, **self._pool_fields(),
        )

    def _pool_fields(self) -> dict[str, Any]:
        rep = self.replica
        pool = rep.pool
        return {"pool": rep.pool_status, "pool_bytes": None if pool is None else pool.snapshot().pool_bytes,
                "pool_chunk_bytes": None if pool is None else pool.chunk_bytes,
                "pool_max_bytes": None if pool is None else rep.app.context_pool.max_bytes}

    # -- what differs for a group replica (``GroupCoordinatorClient``) ------------

    def current_mode(self) -> str:
        return self.replica.engine.mode.value

    def switch_mode(self, mode: str) -> None:
        self.replica.engine.set_mode(MemoryMode(mode))

    def page_out(self, models: list[str], reason: str) -> None:
        """A single-model replica has no weights tier: nothing to page out."""

    def _read_gpu(self):
        if self._fault_nvml_error is not None:
            return None, f"injected fault ({FAULT_NVML_ERROR_ENV}): {self._fault_nvml_error}"
        if self.replica.gpu.virtual:
            return None, None
        try:
            if self._probe is None:
                from engine_runtime.pressure import NvmlProbe

                self._probe = NvmlProbe([self.replica.gpu.uuid])
            readings = self._probe.read()
            return (readings[0] if readings else None), (None if readings else "no NVML reading")
        except Exception as err:  # noqa: BLE001 - NVML failing: report it, the policy holds modes
            self._probe = None
            return None, str(err)

    def apply(self, directive) -> bool:
        """Set the budget and switch mode as told; return whether the mode changed."""
        rep = self.replica
        if directive.budget_bytes is not None:
            rep.admission.set_capacity(int(directive.budget_bytes))
        # Before the switch: a replica told to go static leases from a pool sized for it.
        self._resize_pool(directive.pool_target_bytes)
        # A pinned replica keeps its pin whatever a (possibly stale) directive says.
        page_out = getattr(directive, "page_out", None)
        if page_out:
            self.page_out(list(page_out), directive.page_out_reason)
        target = directive.mode if rep.pin == "auto" else rep.pin
        if target and target != self.current_mode():
            logger.info("coordinator: %s -> %s (%s)", self.current_mode(), target, directive.reason)
            self.switch_mode(target)
            return True
        return False

    def _resize_pool(self, target_bytes: int | None) -> None:
        """Bring the GPU's pool to the coordinator's target.

        Every replica on the pool gets the same target and may act on it: a resize is
        absolute and idempotent, and asked for only when the pool's capacity differs.
        """
        pool = self.replica.pool
        if pool is None or target_bytes is None:
            return
        nchunks = math.ceil(int(target_bytes) / pool.chunk_bytes)
        capacity = pool.snapshot().capacity
        if nchunks == capacity:
            return
        try:
            result = pool.resize(nchunks)
        except PoolUnavailableError as err:
            # The owner is gone (it restarts with the next replica that joins); serve on.
            if self._last_pool_error != str(err):
                logger.warning("context pool: resize to %d chunk(s) failed: %s", nchunks, err)
            self._last_pool_error = str(err)
            return
        self._last_pool_error = result.get("error") or None
        logger.info("context pool: %d -> %d chunk(s) of %.0f MiB (coordinator's target %.0f MiB)%s", capacity,
                    result["capacity"], pool.chunk_bytes / MiB, target_bytes / MiB,
                    f"; {result['error']}" if result.get("error") else "")


class GroupCoordinatorClient(CoordinatorClient):
    """The client of a group replica (``deployments.group``): one report for the whole
    process (its engines summed, resident weights, every model's tier), one mode for
    every engine, and the coordinator's page-out orders carried out where still cold."""

    def current_mode(self) -> str:
        return self.replica.mode.value

    def switch_mode(self, mode: str) -> None:
        self.replica.apply_mode(MemoryMode(mode))

    def page_out(self, models: list[str], reason: str) -> None:
        self.replica.page_out_cold(models, reason)

    def _publish_metrics(self) -> None:
        try:
            self.replica.publish_metrics()
            self._last_metrics_error = None
        except Exception as err:  # noqa: BLE001 - metrics must never stop the reports
            if self._last_metrics_error != str(err):
                logger.warning("metrics not published: %s", err)
            self._last_metrics_error = str(err)

    def build_report(self) -> ReplicaReport:
        rep = self.replica
        stats = rep.stats()
        reading, reading_error = self._read_gpu()
        return ReplicaReport(
            replica_id=rep.replica_id, model=rep.group.name, pid=os.getpid(), node_id=rep.gpu.node_id,
            gpu=rep.gpu.uuid, virtual=rep.gpu.virtual and self._fault_nvml_error is None, pin=rep.pin,
            mode=rep.mode.value, mechanism=rep.mechanism(), weights_bytes=stats.weights_bytes,
            context_bytes=rep.static_context_bytes(), held_bytes=stats.context_bytes_held,
            request_rate_per_s=stats.request_rate_per_s, latency_static_s=stats.latency_p50_s.get("static"),
            latency_dynamic_s=stats.latency_p50_s.get("dynamic"), in_flight=stats.calls_in_flight,
            loaded=rep.loaded(), reading=reading, reading_error=reading_error, floor_bytes=rep.process.floor_bytes,
            group=rep.group.name, models=rep.tier_reports(),
            page_out_under_pressure=rep.group.page_out_under_pressure, cold_after_s=rep.group.cold_after_s,
            **self._pool_fields(),
        )
