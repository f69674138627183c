"""The model deployment: each Serve replica holds one engine.

Memory mode, laziness and batching come from the model's config; ``reconfigure``
(Serve's ``user_config``) changes mode and batching without a restart. The replica
reports its figures to the coordinator, which answers with the mode it should be
in and the admission budget of its GPU (``deployments.coordinator_client``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from deployments.config import AppConfig, ModelConfig
from deployments.engine_factory import make_engine
from deployments.protocol import validation_key
from deployments.replica import ReplicaBase, checked_arrays, log_to_replica_file, parse_pin, run_batch
from engine_runtime.device import check_reachable
from engine_runtime.memory import MemoryMode
from engine_runtime.spec import EngineDescription, validate_inputs

logger = logging.getLogger(__name__)

#: Keys ``user_config`` may carry; anything else is refused with its name.
USER_CONFIG_KEYS = ("mode", "max_batch_size", "batch_wait_timeout_s", "pin", "weights")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class ModelDeployment(ReplicaBase):
    """One engine per replica. Call ``infer`` through a handle or over HTTP (the ingress)."""

    def __init__(self, model: dict, app: dict) -> None:
        log_to_replica_file()
        self.model = ModelConfig.model_validate(model)
        self.app = AppConfig.model_validate(app)
        self.engine = None
        # The start (loads, warm-up, capture) and every engine call run on the replica's
        # one GPU thread (replica.gpu_thread).
        self._open(self.model.name, self._start)

    def _start(self) -> None:
        from deployments.coordinator_client import CoordinatorClient, ReplicaPorts
        from deployments.reporting import ReplicaIdentity

        plan = self._open_process(self.model, self.app)
        self.engine = make_engine(self.model, self.app, admission=self.admission, cuda_index=self.gpu.cuda_index,
                                  physical_source=self.pool, context_plan=plan)
        self.desc = self.engine.describe()
        self._validation_key = validation_key(self.desc)
        self.pin = self.model.pin
        if self.pin != "auto":
            self.engine.set_mode(self.pin)
        self._configure_batching(self.model.batching.max_batch_size, self.model.batching.batch_wait_timeout_s)
        if not self.model.lazy:
            self.engine.warm()
        from deployments.metrics import ReplicaMetrics

        self.metrics = ReplicaMetrics(self.model.name, self.replica_id, self.gpu.uuid)
        #: The ``user_config.weights`` update applied last (its key); None: the source's own.
        self.weights_version: str | None = None
        self.client = CoordinatorClient(ReplicaPorts(
            identity=ReplicaIdentity(self.replica_id, self.model.name, self.gpu, self.desc.weights_bytes,
                                     self.pool_status, self.app.context_pool.max_bytes, self.process.floor_bytes),
            engine=self.engine, admission=self.admission, pool=self.pool, max_shapes=self.desc.max_shapes(),
            pin=lambda: self.pin, publish_metrics=lambda: self.metrics.update_from(self.engine)),
            self.app.coordinator)
        self.client.start()
        logger.info("replica %s of %s on %s (%s mode, %s; context pool %s)", self.replica_id, self.model.name,
                    self.gpu.uuid, self.engine.mode.value, self.engine.mechanism.value, self.pool_status)

    # -- calls ------------------------------------------------------------------

    async def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on named arrays (numpy or torch; batch first); return named numpy arrays.

        Raises an ``engine_runtime`` ``InvalidInputError`` subclass for bad input and
        ``ContextMemoryUnavailable`` when no context memory could be had in time.
        """
        arrived = time.monotonic()
        # Where the engine refuses NaN/inf on the device (one reduction), the host pass
        # over the values is skipped here (~10 ms for a 60 MB batch) and done only for a
        # batch that failed it.
        host_finite = self.model.reject_non_finite and not self.engine.checks_finite_on_device
        arrays = checked_arrays(inputs, self.desc, self._validation_key, host_finite, validate_inputs)
        try:
            result = await self._batched((arrays, arrived, host_finite))
        finally:
            self.call_path.record("replica", time.monotonic() - arrived)
        if isinstance(result, BaseException):
            raise result  # this request's group failed; the batch's other groups did not
        return result

    async def _run_batch(self, queued: list[tuple[dict[str, np.ndarray], float, bool]]
                       ) -> list[dict[str, np.ndarray] | Exception]:
        """One engine call per group of compatible requests. A group's failure is handed
        to its own requests only (as the item, raised by ``infer``): raised from here,
        Serve would fail every request of the batch."""
        engine = self.engine
        return await run_batch(
            queued, desc=self.desc, admission_deadline_s=engine.admission_deadline_s, validate=validate_inputs,
            executor=self._gpu, path=self.call_path,
            call=lambda merged, deadline_s, checked: engine.infer(merged, deadline_s=deadline_s,
                                                                  finite_checked=checked, inputs_checked=True))

    def describe(self) -> EngineDescription:
        """The engine's description (names, dtypes, profiles, weights bytes)."""
        return self.desc

    def batching(self) -> dict[str, int | float]:
        """The batching applied now (``max_batch_size``, ``batch_wait_timeout_s``), for
        Triton's model configuration (``dynamic_batching``)."""
        return dict(self._batching)

    def ready(self) -> bool:
        """True while this replica can take calls (the engine loads on the first one if lazy;
        a broken engine refuses every call until Serve replaces the replica)."""
        return not self.engine.closed and self.engine.broken is None

    def set_mode(self, mode: str) -> str:
        """Switch memory mode after the call in flight; returns the previous mode."""
        return self.engine.set_mode(mode).value

    def status(self) -> dict:
        """This replica's figures for the status view."""
        return {
            "replica_id": self.replica_id,
            "model": self.model.name,
            "gpu": self.gpu.uuid,
            "virtual_gpu": self.gpu.virtual,
            "pid": os.getpid(),
            "mode": self.engine.mode.value,
            "pin": self.pin,
            "mechanism": self.engine.mechanism.value,
            "pool": self.pool_status,
            # Where the arena maps memory: pieces mapped, and pieces a call found still
            # mapped from its last one (context_pool.keep_mapped); None without an arena.
            "mapping": self.engine.mapping_counts(),
            "loaded": self.engine.loaded,
            "closed": self.engine.closed,
            "batching": dict(self._batching),
            "stats": self.engine.stats().to_dict(),
            # Where a call's time goes inside this replica (deployments.call_path).
            "call_path": self.call_path.summary(),
            "weights_version": self.weights_version,
            "process": self.process.to_dict(),
            "coordinator": self.client.last_contact(),
        }

    # -- lifecycle --------------------------------------------------------------

    def _configure_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        # Serve counts requests, each of at least one sample: cap by the engine's max batch.
        max_batch_size = max(1, min(max_batch_size, self.desc.max_batch))
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # Serve's batch wrapper has no public getters: keep what was applied, for status().
        self._batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Figures for Ebb's memory-aware autoscaling policy (Serve ships them to its controller)."""
        from deployments.autoscaling import replica_stats

        report, directive = self.client.last_report, self.client.last_directive
        if report is None or directive is None:
            return {}
        return replica_stats(self.gpu.uuid, report.weights_bytes, report.context_bytes,
                             getattr(directive, "room_bytes", None), getattr(directive, "reclaimable_bytes", 0))

    def reconfigure(self, user_config: dict) -> None:
        """Apply ``user_config``: ``mode``, ``pin``, ``max_batch_size``, ``batch_wait_timeout_s``,
        ``weights`` (``deployments.weights``: new weights in place, between two calls)."""
        user_config = dict(user_config or {})
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"user_config of {self.model.name!r}: unknown key(s) {unknown}; "
                             f"allowed: {list(USER_CONFIG_KEYS)}")
        if "weights" in user_config:
            # First: a refused update raises before anything else changed.
            self._update_weights(user_config["weights"])
        if "pin" in user_config:
            self.pin = parse_pin(user_config["pin"])
            if self.pin != "auto":
                self.engine.set_mode(self.pin)
        if "mode" in user_config:
            self.engine.set_mode(MemoryMode.parse(user_config["mode"]))
        batching = self.model.batching
        self._configure_batching(int(user_config.get("max_batch_size", batching.max_batch_size)),
                                 float(user_config.get("batch_wait_timeout_s", batching.batch_wait_timeout_s)))

    def _update_weights(self, raw: Any) -> None:
        from deployments.weights import load_weights, parse_weights_update

        update = parse_weights_update(raw, self.model.name)
        if update.key == self.weights_version:
            return  # Serve passes the whole user_config on every change: apply once per version
        weights = load_weights(update, self.model, self.app)
        self.engine.update_weights(weights)
        logger.info("replica %s of %s: weights %s -> %s", self.replica_id, self.model.name,
                    self.weights_version or "initial", update.key)
        self.weights_version = update.key

    def check_health(self) -> None:
        """Raise if the engine cannot answer or its GPU is unreachable (Serve restarts us)."""
        if self.engine.closed:
            raise RuntimeError(f"engine {self.model.name!r} is closed")
        if self.engine.broken is not None:
            # A sticky CUDA error: this process's context cannot run anything again.
            raise RuntimeError(f"engine {self.model.name!r} is broken: {self.engine.broken}")
        if self.gpu.cuda_index is not None and self.engine.loaded:
            check_reachable(self.gpu.cuda_index)

    def shutdown(self) -> None:
        """Give back every byte this replica holds: the coordinator client, the engine,
        the pool, then the admission budget (``ReplicaBase._release``). Idempotent."""
        engine = getattr(self, "engine", None)  # None: __init__ stopped before the start

        def close_engine() -> None:
            engine.close()
            held = engine.stats().context_bytes_held
            log = logger.warning if held else logger.info
            log("replica %s of %s shut down: engine closed, %.1f MiB (%d bytes) of context memory "
                "still held", getattr(self, "replica_id", "?"), self.model.name, held / 2**20, held)

        self._release(None if engine is None else close_engine)

    def __del__(self) -> None:
        # Serve's graceful shutdown calls __del__ (its documented hook for a replica's
        # cleanup): the explicit, idempotent shutdown does the work.
        self.shutdown()
