"""Many engines in one process: weights tiered by bytes and last use, one context source.

A group holds an engine per model. Within the group's GPU weights budget the weights
of models used least often lately go to host memory (or are unloaded,
``host_tier=False``): the order is LRU-2 (``group.eviction``: by second-to-last use,
so a run of one-off calls to cold models does not push out a frequently used one). A
call to a model whose weights are not on the GPU first makes room (paging out models
that have no call in flight, in that order), brings them back (one pinned
host-to-device copy, at the same device addresses, for the PyTorch backend on a GPU),
then runs.

Residency changes run outside the group's lock, on the thread of the call that needs
the room, and each engine moves its weights on its own stream under its own call
lock: a call to a resident model never waits for another model's page-out or page-in
(only for the GPU itself, and for the group's context admission while another call
*runs*). The group's lock only guards the bookkeeping (bytes committed, calls in
flight, who is moving) and is never held across a copy or a driver call; nor is the
GIL (PyTorch releases it in copies and synchronisations, cuda-bindings from 12.9.1 in
driver calls: hence the floor on cuda-python in pyproject.toml). The victim's
device memory is released on the same thread, before the page-in maps its own: the
budget bounds the bytes mapped, not just the bytes counted, so the release cannot be
deferred past the page-in, and it is on the cold call's path only.

Context memory: every engine draws it through the group's one ``GroupAdmission`` (one
call's context at a time, then the replica's admission) and, where a physical source
is given (the GPU's pool), from that one source; never one reservation per model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine_runtime.engine import Engine
from engine_runtime.errors import (
    EbbError,
    EngineClosedError,
    UnknownModelError,
    WeightsBudgetUnavailable,
)
from engine_runtime.group.admission import GroupAdmission
from engine_runtime.group.eviction import UseHistory, eviction_key
from engine_runtime.memory import MemoryMode
from engine_runtime.memory.admission import Admission
from engine_runtime.units import MiB
from engine_runtime.weights_tier import GroupBudget, ModelTierStatus, WeightsTier

logger = logging.getLogger(__name__)


class GroupConfigError(EbbError, ValueError):
    """A model cannot be added to the group (a duplicate name, weights over the whole budget)."""


@dataclass
class _Entry:
    name: str
    engine: Engine
    #: Device bytes of the weights when resident (known before loading, rounded as mapped).
    weights_bytes: int
    last_used_s: float | None = None
    #: The last two uses in the group's monotonic order (the page-out order, ``eviction``).
    uses: UseHistory = field(default_factory=UseHistory)
    calls: int = 0
    in_flight: int = 0
    #: A thread is paging this model in or out; others wait for it.
    moving: bool = False
    #: Counted against the budget: resident, or being paged in or out.
    committed: bool = False
    context_bytes: int | None = None


class EngineGroup:
    """Engines for several models in one process, sharing its GPU within a weights budget."""

    def __init__(self, budget: GroupBudget, *, admission: Admission | None = None,
                 physical_source: Any = None, name: str = "group", deadline_s: float = 5.0,
                 concurrent_calls: int = 1, clock: Callable[[], float] = time.time) -> None:
        self.budget = budget
        self.name = name
        self.deadline_s = float(deadline_s)
        if int(concurrent_calls) < 1:
            raise GroupConfigError(f"group {name!r}: concurrent_calls must be at least 1, got {concurrent_calls}")
        #: Calls whose context memory the group holds at once (the policy counts this many).
        self.concurrent_calls = int(concurrent_calls)
        #: Every engine's per-call context goes through this one admission: at most
        #: ``concurrent_calls`` of the largest call at once, then the replica's admission.
        self.admission = GroupAdmission(lambda: self.context_bytes_per_call() * self.concurrent_calls, admission,
                                        where=f"group {name}")
        #: Where engines map their per-call context from (the GPU's pool), shared; None: the driver.
        self.physical_source = physical_source
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._seq = 0
        self._committed_bytes = 0
        self._closed = False

    # -- membership ---------------------------------------------------------------

    def add(self, name: str, make_engine: Callable[[], Engine], *, lazy: bool = True) -> None:
        """Make the model's engine (nothing on the GPU yet); ``lazy=False`` brings it onto
        the GPU now (paging others out if the budget says so)."""
        with self._cond:
            self._check_open()
            if name in self._entries:
                raise GroupConfigError(f"group {self.name!r} already holds a model named {name!r}")
        engine = make_engine()
        try:
            engine.attach_context_source(self.admission, self.physical_source)
            nbytes = int(engine.weights_device_bytes())
            limit = self.budget.gpu_weights_budget_bytes
            if limit is not None and nbytes > limit:
                raise GroupConfigError(
                    f"model {name!r}'s weights ({nbytes / MiB:.1f} MiB) are larger than group "
                    f"{self.name!r}'s whole GPU weights budget ({limit / MiB:.1f} MiB)")
            with self._cond:
                self._check_open()
                if name in self._entries:
                    raise GroupConfigError(f"group {self.name!r} already holds a model named {name!r}")
                self._entries[name] = _Entry(name, engine, nbytes)
        except BaseException:
            engine.close()
            raise
        if not lazy:
            self.ensure_resident(name)

    def remove(self, name: str) -> None:
        """Close ``name``'s engine (after its calls in flight) and forget the model."""
        entry = self._entry(name)
        t0 = time.monotonic()
        end = t0 + self.deadline_s
        with self._cond:
            while entry.moving or entry.in_flight:
                self._wait_locked(entry, end, t0)
            entry.moving = True  # nobody plans with it any more
            del self._entries[name]
        try:
            entry.engine.close()
        finally:
            with self._cond:
                if entry.committed:
                    self._committed_bytes -= entry.weights_bytes
                    entry.committed = False
                self._cond.notify_all()

    def set_budget(self, budget: GroupBudget) -> list[str]:
        """A new budget from now on; idle models over it are paged out at once (in the
        page-out order), busy ones as later calls make room. Returns those paged out."""
        with self._cond:
            self._check_open()
            self.budget = budget
            limit = budget.gpu_weights_budget_bytes
            over = 0 if limit is None else self._committed_bytes - limit
        return self.page_out_cold(over) if over > 0 else []

    def names(self) -> list[str]:
        with self._cond:
            return list(self._entries)

    def engine(self, name: str) -> Engine:
        return self._entry(name).engine

    def tier(self, name: str) -> WeightsTier:
        """Where ``name``'s weights are now (a read without the lock: it may change at once)."""
        return self._entry(name).engine.weights_tier

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError(name, list(self._entries), f"group {self.name!r}")
        return entry

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(f"group {self.name}")

    # -- calls --------------------------------------------------------------------

    def infer(self, name: str, inputs: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        """Run one call of ``name``, bringing its weights onto the GPU first if needed."""
        entry = self._entry(name)
        deadline_s = kw.get("deadline_s")
        self._acquire(entry, self.deadline_s if deadline_s is None else float(deadline_s), call=True)
        try:
            return entry.engine.infer(inputs, **kw)
        finally:
            self._release(entry, call=True)

    def ensure_resident(self, name: str, deadline_s: float | None = None) -> float:
        """Bring ``name``'s weights onto the GPU (making room) within ``deadline_s`` (the
        group's deadline when None); seconds spent paging, 0 if resident."""
        entry = self._entry(name)
        seconds = self._acquire(entry, self.deadline_s if deadline_s is None else float(deadline_s), call=False)
        self._release(entry, call=False)
        return seconds

    def _acquire(self, entry: _Entry, deadline_s: float, *, call: bool) -> float:
        """Count a call in flight on ``entry`` and make it resident; seconds spent paging it in.
        Only a ``call`` counts as a use for the page-out order (a page-in asked for, as when a
        replica preloads its models, moves recency only)."""
        t0 = time.monotonic()
        end = t0 + max(0.0, deadline_s)
        with self._cond:
            self._check_open()
            entry.in_flight += 1
            self._touch(entry, new_use=call)
            try:
                victims = self._plan_locked(entry, end, t0)
            except BaseException:
                entry.in_flight -= 1
                self._cond.notify_all()
                raise
            if victims is None:
                return 0.0
        # Outside the lock: other models' calls go on while this one moves weights.
        t_page = time.perf_counter()
        done = 0
        try:
            for victim in victims:
                done += 1
                self._page_out_now(victim)
            entry.engine.page_in_weights()
            if self.budget.host_tier and self.budget.gpu_weights_budget_bytes is not None:
                # Pinned host memory for its page-out now, not under traffic later (no-op if there).
                entry.engine.prepare_host_tier()
        except BaseException:
            with self._cond:
                for victim in victims[done:]:  # planned, never started
                    victim.moving = False
                entry.moving = False
                self._sync_committed_locked(entry)
                entry.in_flight -= 1
                self._cond.notify_all()
            raise
        seconds = time.perf_counter() - t_page
        with self._cond:
            entry.moving = False
            self._sync_committed_locked(entry)
            self._cond.notify_all()
        return seconds

    def _plan_locked(self, entry: _Entry, end: float, t0: float) -> list[_Entry] | None:
        """Under the lock: None if ``entry`` is resident; else the victims to page out first
        (marked moving, as ``entry`` is), waiting until room can be made or the deadline."""
        while True:
            if entry.moving:  # another thread is paging it in or out: wait for that
                self._wait_locked(entry, end, t0)
                continue
            if entry.engine.weights_tier is WeightsTier.GPU:
                return None
            limit = self.budget.gpu_weights_budget_bytes
            victims: list[_Entry] = []
            if limit is not None:
                free = limit - self._committed_bytes
                candidates = self._eviction_order_locked(exclude=entry)
                for e in candidates:
                    if free >= entry.weights_bytes:
                        break
                    victims.append(e)
                    free += e.weights_bytes
                if free < entry.weights_bytes:
                    self._wait_locked(entry, end, t0)
                    continue
            for e in victims:
                e.moving = True
            entry.moving = True
            if not entry.committed:
                entry.committed = True
                self._committed_bytes += entry.weights_bytes
            return victims

    def _wait_locked(self, entry: _Entry, end: float, t0: float) -> None:
        left = end - time.monotonic()
        if left <= 0:
            raise WeightsBudgetUnavailable(entry.name, entry.weights_bytes, self.budget.gpu_weights_budget_bytes or 0,
                                           self._committed_bytes, time.monotonic() - t0, f"group {self.name!r}")
        self._cond.wait(left)

    def _release(self, entry: _Entry, *, call: bool) -> None:
        with self._cond:
            entry.in_flight -= 1
            if call:
                entry.calls += 1  # under the lock: concurrent calls to one model each count
            self._touch(entry, new_use=False)
            self._cond.notify_all()
        if entry.context_bytes is None and entry.engine.loaded:
            entry.context_bytes = _max_context_bytes(entry.engine)

    def _touch(self, entry: _Entry, *, new_use: bool) -> None:
        """A call to ``entry`` starts (``new_use``) or ends (recency only)."""
        self._seq += 1
        if new_use:
            entry.uses.record_use(self._seq)
        else:
            entry.uses.refresh(self._seq)
        entry.last_used_s = self._clock()

    def _eviction_order_locked(self, exclude: _Entry | None = None) -> list[_Entry]:
        """Resident models that may be paged out now (no call in flight, not moving), the
        first to go first (LRU-2: ``eviction.eviction_key``)."""
        return sorted((e for e in self._entries.values()
                       if e is not exclude and e.committed and not e.moving and e.in_flight == 0),
                      key=lambda e: eviction_key(e.uses))

    def _sync_committed_locked(self, entry: _Entry) -> None:
        """Count ``entry`` against the budget exactly when its weights are on the GPU."""
        resident = entry.engine.weights_tier is WeightsTier.GPU
        if resident and not entry.committed:
            self._committed_bytes += entry.weights_bytes
        elif not resident and entry.committed:
            self._committed_bytes -= entry.weights_bytes
        entry.committed = resident

    def _page_out_now(self, victim: _Entry) -> int:
        """Page ``victim`` out (marked moving by the caller); unmarks it whatever happens."""
        try:
            freed = victim.engine.page_out_weights(host=self.budget.host_tier)
            logger.debug("group %s: %s paged out (%.1f MiB)", self.name, victim.name, freed / MiB)
            return freed
        finally:
            with self._cond:
                victim.moving = False
                self._sync_committed_locked(victim)
                self._cond.notify_all()

    # -- residency on request -------------------------------------------------------

    def page_out(self, name: str) -> int:
        """Page ``name``'s weights out now (after its calls in flight); device bytes freed."""
        entry = self._entry(name)
        t0 = time.monotonic()
        end = t0 + self.deadline_s
        with self._cond:
            self._check_open()
            while entry.moving or entry.in_flight:
                self._wait_locked(entry, end, t0)
            if entry.engine.weights_tier is not WeightsTier.GPU and self.budget.host_tier:
                return 0
            entry.moving = True
        return self._page_out_now(entry)

    def page_out_cold(self, bytes_wanted: int) -> list[str]:
        """Page out idle resident models, in the group's page-out order (LRU-2), until
        ``bytes_wanted`` device bytes are freed (a smaller budget); their names."""
        with self._cond:
            self._check_open()
            chosen: list[_Entry] = []
            total = 0
            for e in self._eviction_order_locked():
                if total >= bytes_wanted:
                    break
                e.moving = True
                chosen.append(e)
                total += e.weights_bytes
        names = []
        for e in chosen:
            if self._page_out_now(e):
                names.append(e.name)
        return names

    # -- views --------------------------------------------------------------------

    def status(self) -> list[ModelTierStatus]:
        with self._cond:
            entries = list(self._entries.values())
        out = []
        for e in entries:
            counts = e.engine.tier_counts()
            out.append(ModelTierStatus(
                name=e.name, tier=e.engine.weights_tier, weights_bytes=e.weights_bytes, last_used_s=e.last_used_s,
                page_ins=int(counts["page_ins"]), page_in_seconds_total=float(counts["page_in_seconds_total"]),
                page_outs=int(counts["page_outs"]), calls=e.calls))
        return out

    def resident_weights_bytes(self) -> int:
        """Device bytes of the weights on the GPU now (and of those being paged in)."""
        return self._committed_bytes

    def context_bytes_per_call(self) -> int:
        """The largest one-call context of the group's loaded engines (what one call adds)."""
        return max((e.context_bytes or 0 for e in list(self._entries.values())), default=0)

    def set_mode(self, mode: MemoryMode | str) -> None:
        """Every engine to ``mode`` (each after its call in flight)."""
        for e in list(self._entries.values()):
            e.engine.set_mode(mode)

    def close(self) -> None:
        """Close every engine (after its call in flight). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            entries = list(self._entries.values())
            self._cond.notify_all()
        errors = []
        for e in entries:
            try:
                e.engine.close()
            except Exception as err:  # noqa: BLE001 - close the others, then say which failed
                errors.append(f"{e.name}: {err}")
        with self._cond:
            self._committed_bytes = 0
            for e in entries:
                e.committed = False
        if errors:
            logger.error("group %s: closing engines failed: %s", self.name, "; ".join(errors))

    def __enter__(self) -> EngineGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _max_context_bytes(engine: Engine) -> int:
    """Context bytes of ``engine``'s largest call (every input at its profile's maximum)."""
    try:
        desc = engine.describe()
        return int(engine.context_bytes({name: tuple(p.max) for name, p in desc.profiles.items()}))
    except Exception:
        logger.debug("context bytes of %s unknown", getattr(engine, "name", "?"), exc_info=True)
        return 0
