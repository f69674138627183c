"""The group deployment: each Serve replica is one process holding an ``EngineGroup``
for all of a group's models (one CUDA context, one per-process floor, one source of
context memory, weights tiered by bytes between the GPU and pinned host memory).

Requests reach a replica through Serve's model multiplexing: the model name is the
multiplexed model id (``handle.options(multiplexed_model_id="resnet-a")``; the HTTP
ingress does this for ``/v2/models/resnet-a/infer``), so Serve's router prefers a
replica that has served the model. Serve's multiplexing knows no bytes and evicts by
count; the loader is therefore sized to the whole group (Serve never evicts) and
returns at once, and the ``EngineGroup`` decides by bytes what stays on the GPU. An
unknown model id is refused before the loader runs (no load attempt, no routing entry).

Batches hold one model's requests only: Serve splits a batch by multiplexed model id,
and the handler groups by model again (a request's model travels with it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from deployments.config import AppConfig, GroupConfig, ModelConfig
from deployments.engine_factory import make_engine
from deployments.group_report import aggregate_stats, tier_reports
from deployments.local_handle import local_model_id
from deployments.protocol import validation_key
from deployments.replica import ReplicaBase, checked_arrays, log_to_replica_file, parse_pin, run_batch
from engine_runtime import (
    ContextMechanism,
    EngineDescription,
    EngineGroup,
    GroupBudget,
    MemoryMode,
    StatsSnapshot,
    UnboundedAdmission,
    UnknownModelError,
    WeightsTier,
    process_memory_breakdown,
)
from engine_runtime.device import check_reachable
from engine_runtime.spec import validate_inputs

logger = logging.getLogger(__name__)

#: Keys a group's ``user_config`` may carry (weights updates are per single-model deployment).
GROUP_USER_CONFIG_KEYS = ("mode", "pin", "max_batch_size", "batch_wait_timeout_s")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class GroupDeployment(ReplicaBase):
    """One ``EngineGroup`` per replica. Call ``infer`` through a handle with
    ``.options(multiplexed_model_id=<model>)``, or over HTTP (the ingress)."""

    #: A batch holds one model's requests: the queued item's first field is its model.
    _batch_key = staticmethod(lambda queued: queued[0])
    #: The thread that brings a called model's weights back from host memory before its
    #: request joins the batch queue (``_page_in_first``); None: asyncio's default executor.
    _paging = None

    def __init__(self, group: dict, models: list[dict], app: dict) -> None:
        log_to_replica_file()
        self.started_s = time.time()
        self.group = GroupConfig.model_validate(group)
        self.app = AppConfig.model_validate(app)
        self.models = {m["name"]: ModelConfig.model_validate(m) for m in models}
        self.engines = None
        self._paging = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ebb-paging-{self.group.name}")
        # The start (the engines' loads, warm-ups, captures) and every engine call run on
        # the replica's one GPU thread (replica.gpu_thread).
        self._open(self.group.name, self._start)

    def _start(self) -> None:
        from deployments.coordinator_client import CoordinatorClient, ReplicaPorts
        from deployments.reporting import ReplicaIdentity

        # One pool client for the process; the group hands it to every engine, each of
        # which plans its own mechanism from its device's facts when it loads.
        self._open_process(next(iter(self.models.values())), self.app)
        self.engines = EngineGroup(
            GroupBudget(self.group.gpu_weights_budget_bytes, self.group.host_tier),
            # With the pool the lease is the admission (as for a single model, engine_factory).
            admission=UnboundedAdmission() if self.pool is not None else self.admission,
            physical_source=self.pool, name=self.group.name,
            deadline_s=self.app.coordinator.admission_deadline_s)
        self.mode = MemoryMode.parse(self.group.mode)
        self.pin = self.group.pin
        if self.pin != "auto":
            self.mode = MemoryMode.parse(self.pin)
        for m in self.models.values():
            # Each engine starts in the group's mode; the group gives it the shared context source.
            model = m.model_copy(update={"mode": self.mode.value})
            self.engines.add(m.name, lambda model=model: make_engine(model, self.app, cuda_index=self.gpu.cuda_index),
                             lazy=model.lazy)
        self.descs: dict[str, EngineDescription] = {n: self.engines.engine(n).describe() for n in self.models}
        # What inputs the ingress checked are matched against, once per model, not per call.
        self._validation_keys = {n: validation_key(d) for n, d in self.descs.items()}
        self._configure_batching(self.group.batching.max_batch_size, self.group.batching.batch_wait_timeout_s)

        #: Model ids Serve's multiplexing has registered on this replica (for the status view).
        self.multiplexed_model_ids: list[str] = []

        async def load(model_id: str) -> str:
            # Serve's "loaded" set is the models this replica serves; the weights' tier is
            # the EngineGroup's (a call pages them in), so nothing is loaded here.
            self.multiplexed_model_ids.append(model_id)
            return model_id

        # Sized to the group, so Serve never evicts by count; Ebb evicts by bytes.
        self._load_model = serve.multiplexed(max_num_models_per_replica=len(self.models))(load)
        self._seen_acquisitions: dict[str, int] = {}
        from deployments.metrics import ModelTierMetrics, ReplicaMetrics

        self.metrics = ReplicaMetrics(self.group.name, self.replica_id, self.gpu.uuid)
        self.tier_metrics = ModelTierMetrics(self.group.name, self.replica_id, self.gpu.uuid)
        self.client = CoordinatorClient(ReplicaPorts(
            identity=ReplicaIdentity(self.replica_id, self.group.name, self.gpu, 0, self.pool_status,
                                     self.app.context_pool.max_bytes, self.process.floor_bytes),
            engine=_GroupEngineView(self), admission=self.admission, pool=self.pool, max_shapes={},
            pin=lambda: self.pin, publish_metrics=self.publish_metrics, group=self), self.app.coordinator)
        self.client.start()
        logger.info("replica %s of group %s on %s: %d models, weights budget %s, host tier %s, %s mode, "
                    "context pool %s", self.replica_id, self.group.name, self.gpu.uuid, len(self.models),
                    self.group.gpu_weights_budget_bytes, self.group.host_tier, self.mode.value, self.pool_status)

    # -- calls ------------------------------------------------------------------

    def _model_id(self) -> str:
        """The request's model (its multiplexed model id, or the local handle's where the
        group is embedded in the ingress), refused unless the group has it."""
        name = local_model_id() or serve.get_multiplexed_model_id()
        if not name:
            raise UnknownModelError("", list(self.models), f"group {self.group.name!r} (call it with "
                                    f"handle.options(multiplexed_model_id=<model>))")
        if name not in self.models:
            raise UnknownModelError(name, list(self.models), f"group {self.group.name!r}")
        return name

    async def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the request's model (``multiplexed_model_id``) on named arrays; return named numpy arrays.

        Raises ``UnknownModelError`` for a model the group does not hold (nothing is loaded),
        an ``InvalidInputError`` subclass for bad input, and ``ContextMemoryUnavailable``
        (or its ``WeightsBudgetUnavailable``) when memory could not be had in time.
        """
        arrived = time.monotonic()
        name = self._model_id()
        if local_model_id() is None:
            # Serve's routing record of the models this replica serves (an embedded group
            # is routed by its ingress, not by Serve).
            await self._load_model(name)
        desc = self.descs[name]
        host_finite = (self.models[name].reject_non_finite
                       and not self.engines.engine(name).checks_finite_on_device)
        arrays = checked_arrays(inputs, desc, self._validation_keys[name], host_finite, validate_inputs)
        await self._page_in_first(name, arrived)
        try:
            result = await self._batched((name, arrays, arrived, host_finite))
        finally:
            self.call_path.record("replica", time.monotonic() - arrived)
        if isinstance(result, BaseException):
            raise result  # this request's group of the batch failed; the others did not
        return result

    async def _page_in_first(self, name: str, arrived: float) -> None:
        """Weights in host memory come back before the request joins the batch queue.

        Serve runs one batch at a time: a model paged in by its own engine call (a victim's
        page-out, then the copy in) held every other model's requests behind it, the hot
        ones too. Here the copy runs on the paging thread while the batch queue goes on;
        the call then finds the weights resident (or, evicted again meanwhile, pages them in
        itself, as before). Only the host tier: a model not loaded at all is built, with
        warm-up and capture, on the GPU thread, which holds the replica's cuBLAS/cuDNN
        handles (``replica.gpu_thread``). A failure is the request's, as it would be in the
        call (``WeightsBudgetUnavailable`` 503, ``WeightsPageError``).
        """
        if self.engines.tier(name) is not WeightsTier.HOST:
            return
        deadline_s = self.app.coordinator.admission_deadline_s - (time.monotonic() - arrived)
        await asyncio.get_running_loop().run_in_executor(
            self._paging, functools.partial(self.engines.ensure_resident, name, deadline_s=max(0.0, deadline_s)))

    async def _run_batch(self, queued: list[tuple[str, dict[str, np.ndarray], float, bool]]
                       ) -> list[dict[str, np.ndarray] | Exception]:
        """Requests of one model per engine call: grouped by model (the batcher's key makes
        each batch one model's already), then by shape, each group's failure its own."""
        results: list[Any] = [None] * len(queued)
        by_model: dict[str, list[int]] = {}
        for i, (name, _, _, _) in enumerate(queued):
            by_model.setdefault(name, []).append(i)
        for name, indices in by_model.items():
            def call(merged, deadline_s, checked, name=name):
                return self.engines.infer(name, merged, deadline_s=deadline_s, finite_checked=checked)

            out = await run_batch([queued[i][1:] for i in indices], call=call, desc=self.descs[name],
                                  admission_deadline_s=self.app.coordinator.admission_deadline_s,
                                  validate=validate_inputs, executor=self._gpu, path=self.call_path)
            for i, r in zip(indices, out):
                results[i] = r
        return results

    def describe(self) -> EngineDescription:
        """The request's model's description (names, dtypes, profiles, weights bytes)."""
        return self.descs[self._model_id()]

    def batching(self) -> dict[str, int | float]:
        """The batching applied now, for Triton's model configuration (``dynamic_batching``)."""
        return dict(self._batching)

    def ready(self) -> bool:
        """True while this replica can take calls (weights come onto the GPU on a call; a
        broken engine refuses every call until Serve replaces the replica)."""
        return not self._closed() and not self._broken()

    def set_mode(self, mode: str) -> str:
        """Every engine to ``mode`` after its call in flight; returns the previous mode."""
        previous = self.mode
        self.apply_mode(MemoryMode.parse(mode))
        return previous.value

    # -- what the coordinator client reads and orders ------------------------------

    def apply_mode(self, mode: MemoryMode) -> None:
        self.engines.set_mode(mode)
        self.mode = mode

    def page_out_cold(self, models: list[str], reason: str) -> list[str]:
        """Page out the models the coordinator named, each only if still cold here (a call
        since the order makes it hot: paging it out would cost its next call a page-in)."""
        now = time.time()
        by_name = {m.name: m for m in self.engines.status()}
        done = []
        for name in models:
            m = by_name.get(name)
            if m is None or m.tier is not WeightsTier.GPU:
                continue
            idle_s = now - (m.last_used_s if m.last_used_s is not None else self.started_s)
            if idle_s < self.group.cold_after_s:
                continue
            freed = self.engines.page_out(name)
            logger.info("group %s: paged out %s (%.1f MiB, idle %.0f s) at the coordinator's request: %s",
                        self.group.name, name, freed / 2**20, idle_s, reason)
            done.append(name)
        return done

    def tier_reports(self):
        return tier_reports(self.engines.status(), time.time(), self.started_s)

    def report_fields(self) -> dict[str, Any]:
        """What a group replica's report adds (``reporting.make_report``): its resident
        weights (they vary) and every model's tier."""
        return {"weights_bytes": self.engines.resident_weights_bytes(), "group": self.group.name,
                "models": self.tier_reports(), "page_out_under_pressure": self.group.page_out_under_pressure,
                "cold_after_s": self.group.cold_after_s}

    def stats(self) -> StatsSnapshot:
        return aggregate_stats([self.engines.engine(n).stats() for n in self.models],
                               self.engines.resident_weights_bytes())

    def static_context_bytes(self) -> int:
        """Context bytes the replica holds in static mode: each resident engine's largest call."""
        total = 0
        for name in self.models:
            engine = self.engines.engine(name)
            if engine.loaded and engine.weights_tier is WeightsTier.GPU:
                total += engine.context_bytes(self.descs[name].max_shapes())
        return total

    def mechanism_enum(self) -> ContextMechanism:
        engines = [self.engines.engine(n) for n in self.models]
        loaded = [e for e in engines if e.loaded] or engines
        return loaded[0].mechanism

    def mechanism(self) -> str:
        return self.mechanism_enum().value

    def loaded(self) -> bool:
        return any(self.engines.engine(n).loaded for n in self.models)

    def _closed(self) -> bool:
        return any(self.engines.engine(n).closed for n in self.models)

    def _broken(self) -> dict[str, str]:
        """Each broken engine's name and why (``BaseEngine.broken``)."""
        return {n: why for n in self.models if (why := self.engines.engine(n).broken) is not None}

    def publish_metrics(self) -> None:
        """The replica's summed figures and each model's tier (from the report loop)."""
        durations: list[float] = []
        for name in self.models:
            seen, new = self.engines.engine(name).acquisition_durations_since(self._seen_acquisitions.get(name, 0))
            self._seen_acquisitions[name] = seen
            durations.extend(new)
        self.metrics.update(self.mode, self.stats(), durations)
        self.tier_metrics.update(self.tier_reports())

    # -- views ------------------------------------------------------------------

    def status(self) -> dict:
        """This replica's figures for the status view, with every model's tier."""
        stats = self.stats()
        return {
            "replica_id": self.replica_id,
            "group": self.group.name,
            "gpu": self.gpu.uuid,
            "virtual_gpu": self.gpu.virtual,
            "pid": os.getpid(),
            "mode": self.mode.value,
            "pin": self.pin,
            "mechanism": self.mechanism(),
            "pool": self.pool_status,
            "weights_budget_bytes": self.group.gpu_weights_budget_bytes,
            "host_tier": self.group.host_tier,
            "resident_weights_bytes": self.engines.resident_weights_bytes(),
            "context_bytes_per_call": self.engines.context_bytes_per_call(),
            "models": [vars(m) for m in self.tier_reports()],
            "multiplexed_model_ids": list(self.multiplexed_model_ids),
            "batching": dict(self._batching),
            "stats": stats.to_dict(),
            "call_path": self.call_path.summary(),
            "process": self.process.to_dict(),
            # NVML now and PyTorch's caching allocator: where memory beyond floor + weights sits.
            "memory": (process_memory_breakdown(self.gpu.cuda_index) if self.gpu.cuda_index is not None else None),
            "coordinator": self.client.last_contact(),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """For the memory-aware policy: a group replica costs its resident weights plus
        one call's context (its engines draw context one call at a time)."""
        from deployments.autoscaling import replica_stats

        directive = self.client.last_directive
        if directive is None:
            return {}
        return replica_stats(self.gpu.uuid, self.engines.resident_weights_bytes(),
                             self.engines.context_bytes_per_call(), getattr(directive, "room_bytes", None),
                             getattr(directive, "reclaimable_bytes", 0))

    # -- lifecycle --------------------------------------------------------------

    def _configure_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        # Serve counts requests; no engine call may exceed its model's profile (run_batch splits).
        largest = max(d.max_batch for d in self.descs.values())
        max_batch_size = max(1, min(max_batch_size, largest))
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}

    def reconfigure(self, user_config: dict) -> None:
        """Apply ``user_config``: ``mode``, ``pin``, ``max_batch_size``, ``batch_wait_timeout_s``."""
        user_config = dict(user_config or {})
        unknown = sorted(set(user_config) - set(GROUP_USER_CONFIG_KEYS))
        if unknown:
            hint = " (weights updates are for single-model deployments)" if "weights" in unknown else ""
            raise ValueError(f"user_config of group {self.group.name!r}: unknown key(s) {unknown}; "
                             f"allowed: {list(GROUP_USER_CONFIG_KEYS)}{hint}")
        if "pin" in user_config:
            self.pin = parse_pin(user_config["pin"])
            if self.pin != "auto":
                self.apply_mode(MemoryMode.parse(self.pin))
        if "mode" in user_config:
            self.apply_mode(MemoryMode.parse(user_config["mode"]))
        batching = self.group.batching
        self._configure_batching(int(user_config.get("max_batch_size", batching.max_batch_size)),
                                 float(user_config.get("batch_wait_timeout_s", batching.batch_wait_timeout_s)))

    def check_health(self) -> None:
        """Raise if the group cannot answer or its GPU is unreachable (Serve restarts the replica)."""
        if self._closed():
            raise RuntimeError(f"group {self.group.name!r} is closed")
        broken = self._broken()
        if broken:
            # A sticky CUDA error in one engine: the process's context (shared by every
            # engine of the group) cannot run anything again.
            raise RuntimeError(f"group {self.group.name!r}: engine(s) broken: "
                               + "; ".join(f"{name}: {why}" for name, why in broken.items()))
        if self.gpu.cuda_index is not None and self.loaded():
            check_reachable(self.gpu.cuda_index)

    def shutdown(self) -> None:
        """Give back every byte this replica holds: the coordinator client, every engine,
        the pool, then the admission budget, then its threads (``ReplicaBase._release``).
        Idempotent."""
        engines = getattr(self, "engines", None)  # None: __init__ stopped before the start

        def close_engines() -> None:
            engines.close()
            held = sum(engines.engine(n).stats().context_bytes_held for n in engines.names())
            log = logger.warning if held else logger.info
            log("replica %s of group %s shut down: %d engines closed, %.1f MiB of context memory still "
                "held", getattr(self, "replica_id", "?"), self.group.name, len(engines.names()), held / 2**20)

        self._release(None if engines is None else close_engines, self._paging)

    def __del__(self) -> None:
        # Serve's graceful shutdown calls __del__ (its hook for a replica's cleanup): the
        # explicit, idempotent shutdown does the work.
        self.shutdown()


class _GroupEngineView:
    """The whole group as the one engine the coordinator client reports and switches
    (``coordinator_client.EnginePort``): summed stats, one mode for every engine."""

    def __init__(self, replica: GroupDeployment) -> None:
        self._replica = replica

    @property
    def mode(self) -> MemoryMode:
        return self._replica.mode

    @property
    def mechanism(self) -> ContextMechanism:
        return self._replica.mechanism_enum()

    @property
    def loaded(self) -> bool:
        return self._replica.loaded()

    def stats(self) -> StatsSnapshot:
        return self._replica.stats()

    def context_bytes(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """What the group holds in static mode (``shapes`` is the client's, empty: each
        engine's own largest call is used)."""
        return self._replica.static_context_bytes()

    def set_mode(self, mode: MemoryMode | str) -> MemoryMode:
        previous = self._replica.mode
        self._replica.apply_mode(MemoryMode.parse(mode))
        return previous

