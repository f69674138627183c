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
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.config import CoordinatorConfig
from deployments.coordinator import get_or_create
from deployments.gpu_identity import GpuIdentity
from deployments.messages import Directive, ReplicaReport
from deployments.reporting import ReplicaIdentity, directive_actions, engine_figures, make_report
from engine_runtime import StatsSnapshot
from engine_runtime.memory import ContextMechanism, MemoryMode, SharedBudget, remove_unused_budgets
from engine_runtime.memory.pool import PoolUnavailableError
from engine_runtime.units import MiB

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
    First removes the budget files nobody alive uses (a cluster stopped by ``ray stop``
    leaves its virtual GPUs' files behind; see ``SharedBudget``).
    """
    remove_unused_budgets()
    return SharedBudget(key=gpu.uuid)


# -- the ports: what the client may use of its replica ------------------------------


class EnginePort(Protocol):
    """The engine as the client sees it (``engine_runtime.Engine`` satisfies it)."""

    @property
    def mode(self) -> MemoryMode: ...
    @property
    def mechanism(self) -> ContextMechanism: ...
    @property
    def loaded(self) -> bool: ...
    def stats(self) -> StatsSnapshot: ...
    def context_bytes(self, shapes: Mapping[str, tuple[int, ...]]) -> int: ...
    def set_mode(self, mode: MemoryMode | str) -> MemoryMode: ...


class AdmissionPort(Protocol):
    def set_capacity(self, capacity_bytes: int) -> None: ...


class GroupPort(Protocol):
    """A group replica's tiers (``deployments.group``): what its report adds, and the
    coordinator's page-out orders."""

    def report_fields(self) -> dict[str, Any]: ...
    def page_out_cold(self, models: list[str], reason: str) -> list[str]: ...


class PoolPort(Protocol):
    """The GPU's context pool as the client sees it (``memory.pool.PoolPhysical``)."""

    chunk_bytes: int

    def snapshot(self) -> Any: ...
    def resize(self, nchunks: int) -> dict: ...


@dataclass
class ReplicaPorts:
    """All the client touches of its replica: narrow, so it needs no ``ModelDeployment``."""

    identity: ReplicaIdentity
    engine: EnginePort
    admission: AdmissionPort
    #: The GPU's pool; None where the replica does not lease from one.
    pool: PoolPort | None
    #: The largest shapes of the engine's profiles (the bytes a static engine holds).
    max_shapes: Mapping[str, tuple[int, ...]]
    #: The replica's pin now (``user_config`` may change it).
    pin: Callable[[], str]
    #: Publish the replica's metrics (called before every report).
    publish_metrics: Callable[[], None] = lambda: None
    #: A group replica's tiers; None for a single-model replica.
    group: GroupPort | None = None


class CoordinatorClient:
    def __init__(self, replica: ReplicaPorts, cfg: CoordinatorConfig) -> None:
        self.replica = replica
        self.cfg = cfg
        self.interval_s = cfg.poll_interval_s / 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ebb-coordinator-client", daemon=True)
        self._handle = None
        self._probe = None
        self._last_ok_s: float | None = None
        self._last_error: str | None = None
        self._last_directive: Directive | None = None
        self._last_report: ReplicaReport | None = None
        self._last_metrics_error: str | None = None
        self._last_pool_error: str | None = None
        self._fault_nvml_error = os.environ.get(FAULT_NVML_ERROR_ENV) or None
        if self._fault_nvml_error is not None:
            logger.warning("fault injection on (%s): NVML readings of %s fail with %r", FAULT_NVML_ERROR_ENV,
                           replica.identity.gpu.uuid, self._fault_nvml_error)

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
    def last_directive(self) -> Directive | None:
        return self._last_directive

    # -- loop -------------------------------------------------------------------

    def _publish_metrics(self) -> None:
        try:
            self.replica.publish_metrics()
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
                    logger.warning("coordinator unreachable (%s); keeping mode %s", err,
                                   self.replica.engine.mode.value)
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
        figures = engine_figures(mode=engine.mode.value, mechanism=engine.mechanism.value, loaded=engine.loaded,
                                 stats=engine.stats(),
                                 largest_context_bytes=engine.context_bytes(rep.max_shapes) if engine.loaded else None)
        reading, reading_error = self._read_gpu()
        pool = rep.pool
        return make_report(rep.identity, figures, pid=os.getpid(), pin=rep.pin(), reading=reading,
                           reading_error=reading_error, fault_injected=self._fault_nvml_error is not None,
                           pool_bytes=None if pool is None else pool.snapshot().pool_bytes,
                           pool_chunk_bytes=None if pool is None else pool.chunk_bytes,
                           group=None if rep.group is None else rep.group.report_fields())

    def _read_gpu(self):
        if self._fault_nvml_error is not None:
            return None, f"injected fault ({FAULT_NVML_ERROR_ENV}): {self._fault_nvml_error}"
        gpu = self.replica.identity.gpu
        if gpu.virtual:
            return None, None
        try:
            if self._probe is None:
                from engine_runtime.pressure import NvmlProbe

                self._probe = NvmlProbe([gpu.uuid])
            readings = self._probe.read()
            return (readings[0] if readings else None), (None if readings else "no NVML reading")
        except Exception as err:  # noqa: BLE001 - NVML failing: report it, the policy holds modes
            self._probe = None
            return None, str(err)

    def apply(self, directive: Directive) -> bool:
        """Set the budget, size the pool and switch mode as told; return whether the mode changed."""
        rep = self.replica
        pool = rep.pool
        capacity = None if pool is None or directive.pool_target_bytes is None else pool.snapshot().capacity
        actions = directive_actions(directive, pin=rep.pin(), mode=rep.engine.mode.value,
                                    pool_chunk_bytes=None if pool is None else pool.chunk_bytes,
                                    pool_capacity_chunks=capacity)
        if actions.budget_bytes is not None:
            rep.admission.set_capacity(actions.budget_bytes)
        if actions.pool_chunks is not None:
            self._resize_pool(actions.pool_chunks, capacity, directive.pool_target_bytes)
        if actions.page_out and rep.group is not None:
            rep.group.page_out_cold(list(actions.page_out), directive.page_out_reason)
        if actions.switch_to is not None:
            logger.info("coordinator: %s -> %s (%s)", rep.engine.mode.value, actions.switch_to, directive.reason)
            rep.engine.set_mode(MemoryMode(actions.switch_to))
            return True
        return False

    def _resize_pool(self, nchunks: int, capacity: int, target_bytes: int) -> None:
        pool = self.replica.pool
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
