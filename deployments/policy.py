"""The coordinator's decisions as pure functions: which replica changes mode, how
many bytes dynamic calls may hold on a card, and how large its context pool should be.

Plain data in, plain data out; nothing of Ray. The coordinator actor gathers
``GpuView``/``ReplicaView`` each poll, calls :func:`decide`,
:func:`admission_capacity` and :func:`pool_target_bytes`, and acts on the results.

The rules, per GPU (GPUs never influence each other):

1. **Pins first.** A replica pinned ``static`` or ``dynamic`` is moved to its pin at
   once, whatever the pressure and the dwell time: the operator overrides the policy.
   This holds on a GPU whose probe failed too. The projections below include the
   pins' bytes; the watermarks are compared with the measured use.
2. **Unknown GPU** (probe failed): nothing else moves. Switching to static could run
   the card out of memory; switching to dynamic on no evidence would slow replicas for
   what may be a transient probe error. Holding is the only move that is safe both ways.
3. **Above the high watermark** (measured use > ``high_watermark`` × total): ``auto``
   static replicas go dynamic, cheapest first, until projected use ≤ the target. The
   cost of a replica is the latency its traffic loses per byte freed::

       cost_per_byte = request_rate_per_s × dynamic_penalty_s / context_bytes
       dynamic_penalty_s = max(0, latency_dynamic_s − latency_static_s)
                           (or ``default_dynamic_penalty_s`` when either is unmeasured)

   Ties go to the replica freeing more bytes (fewer switches), then to replica id.
   Before any of them, cold weights leave the GPU (rule 3a).
3a. **Cold weights first.** Above the high watermark, a group replica that allows it
   (``groups[].page_out_under_pressure``) is asked to page out the weights of its cold
   models (on the GPU, unused for ``cold_after_s``), longest idle first, then larger
   first, until projected use ≤ the target. A cold model has no traffic to slow down,
   while going dynamic slows every call of a hot one; a cold model's next call pays
   one page-in (weights bytes / host-to-device bandwidth). Pins do not stop it: they
   are about modes. Such a decision has ``new_mode`` None and names the models.
4. **Below the low watermark** (measured use < ``low_watermark`` × total): ``auto``
   dynamic replicas go back to static, greatest benefit (``request_rate_per_s ×
   dynamic_penalty_s``) first, each only if projected use plus its context bytes stays
   ≤ the target; one that does not fit is skipped and smaller ones still tried.
   Static is the preferred mode whenever it fits, so idle replicas go back too (last).
5. **Between the watermarks** nothing moves (hysteresis).
6. **Dwell**: an ``auto`` replica that switched less than ``min_dwell_s`` ago holds.
7. Dead replicas are ignored; a GPU without live replicas yields nothing.

The target in bytes is ``min(target × total, total − headroom_bytes)``: the fraction
governs large cards, the headroom small ones.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from engine_runtime.memory import MemoryMode
from engine_runtime.units import MiB, GiB



class Pin(str, enum.Enum):
    """Whether the coordinator may move a replica, per model in ``cluster.yaml``."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: Pin | str) -> Pin:
        if isinstance(value, Pin):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown pin {value!r}; expected one of {[p.value for p in cls]}") from None

    @property
    def mode(self) -> MemoryMode | None:
        """The mode a pin forces; ``None`` for ``auto``."""
        return None if self is Pin.AUTO else MemoryMode(self.value)


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's knobs; the pydantic ``CoordinatorConfig`` validates them at the edge."""

    #: Above this share of a GPU's total in use, replicas are switched to dynamic.
    high_watermark: float = 0.90
    #: Below this share, dynamic replicas are switched back to static.
    low_watermark: float = 0.75
    #: Share of the total that switches bring projected use to (and never past, going static).
    target: float = 0.85
    #: A replica keeps an ``auto`` decision at least this long.
    min_dwell_s: float = 5.0
    #: How often the coordinator polls and decides.
    poll_interval_s: float = 0.5
    #: How long a dynamic call waits for admission before HTTP 503.
    admission_deadline_s: float = 5.0
    #: Bytes always left free on a card whatever the fractions say (CUDA contexts of new
    #: processes, allocator slack, the lag between an NVML reading and the budget).
    headroom_bytes: int = 512 * MiB
    #: Latency dynamic mode is assumed to add per call while unmeasured in either mode.
    default_dynamic_penalty_s: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("high_watermark", "low_watermark", "target"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: expected a fraction in (0, 1], got {value}")
        if not self.low_watermark <= self.target <= self.high_watermark:
            raise ValueError(
                "need low_watermark <= target <= high_watermark, got "
                f"{self.low_watermark}/{self.target}/{self.high_watermark}"
            )
        for name in ("min_dwell_s", "headroom_bytes", "default_dynamic_penalty_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("poll_interval_s", "admission_deadline_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")

    def usable_bytes(self, total_bytes: int) -> int:
        """What the card can give before it runs out: all of it but a small headroom."""
        return total_bytes - min(self.headroom_bytes, total_bytes // 20)

    def target_bytes(self, total_bytes: int) -> int:
        return max(0, min(int(self.target * total_bytes), total_bytes - self.headroom_bytes))


@dataclass(frozen=True)
class GpuView:
    """One GPU as the coordinator last read it."""

    uuid: str
    total_bytes: int = 0
    #: Everything in use on the card, other processes included (NVML ``used``).
    used_bytes: int = 0
    #: False when the probe failed: the figures above mean nothing then.
    known: bool = True


@dataclass(frozen=True)
class ColdModel:
    """A model of a group replica whose weights are on the GPU but unused for a while."""

    name: str
    weights_bytes: int
    #: Seconds since its last call (or since the replica started, if never called).
    idle_s: float


@dataclass(frozen=True)
class ReplicaView:
    """One replica's figures as it last reported them."""

    replica_id: str
    gpu_uuid: str
    model: str
    mode: MemoryMode
    pin: Pin
    weights_bytes: int
    #: Context bytes the replica holds in static mode (freed by going dynamic).
    context_bytes: int
    request_rate_per_s: float
    latency_static_s: float | None
    latency_dynamic_s: float | None
    in_flight: int
    #: Coordinator clock time of the last mode switch; None if never switched.
    last_switch_s: float | None
    alive: bool = True
    #: Context bytes held right now (``StatsSnapshot.context_bytes_held``): for a dynamic
    #: replica, what its call in flight holds, which NVML already counts as used.
    context_bytes_held: int = 0
    #: A group replica's models the coordinator may page out (cold, weights on the GPU,
    #: ``page_out_under_pressure``); empty for single-model replicas.
    cold_models: tuple[ColdModel, ...] = ()


@dataclass(frozen=True)
class Decision:
    replica_id: str
    gpu_uuid: str
    #: The mode to switch to; None for a page-out (the mode stays).
    new_mode: MemoryMode | None
    #: Why, with the figures (pressure, watermark, bytes, cost).
    reason: str
    #: Change in the card's use this switch projects: negative going dynamic.
    bytes_delta: int
    #: Projected share of the card in use before and after this switch (None on an unknown GPU).
    pressure_before: float | None
    projected_after: float | None
    #: Models whose weights the replica should page out (rule 3a); empty for a mode switch.
    page_out: tuple[str, ...] = ()


def dynamic_penalty_s(replica: ReplicaView, config: PolicyConfig) -> tuple[float, bool]:
    """Latency dynamic mode adds per call, and whether it was measured (not the default)."""
    if replica.latency_static_s is None or replica.latency_dynamic_s is None:
        return config.default_dynamic_penalty_s, False
    return max(0.0, replica.latency_dynamic_s - replica.latency_static_s), True


def _benefit(replica: ReplicaView, config: PolicyConfig) -> float:
    """Seconds of latency per second of traffic that static mode saves."""
    return max(0.0, replica.request_rate_per_s) * dynamic_penalty_s(replica, config)[0]


def _cost_per_byte(replica: ReplicaView, config: PolicyConfig) -> float:
    return _benefit(replica, config) / replica.context_bytes


def _dwell_ok(replica: ReplicaView, config: PolicyConfig, now_s: float) -> bool:
    return replica.last_switch_s is None or now_s - replica.last_switch_s >= config.min_dwell_s


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _cost_text(replica: ReplicaView, config: PolicyConfig) -> str:
    penalty, measured = dynamic_penalty_s(replica, config)
    source = "measured" if measured else "default, unmeasured"
    return f"rate {replica.request_rate_per_s:.2f}/s × dynamic penalty {penalty * 1e3:.2f} ms ({source})"


def decide(
    gpus: Sequence[GpuView], replicas: Sequence[ReplicaView], config: PolicyConfig, now_s: float
) -> list[Decision]:
    """Mode switches for every GPU, each decided on its own (see the module docstring)."""
    decisions: list[Decision] = []
    seen: set[str] = set()
    for gpu in gpus:
        if gpu.uuid in seen:
            continue
        seen.add(gpu.uuid)
        mine = sorted((r for r in replicas if r.alive and r.gpu_uuid == gpu.uuid), key=lambda r: r.replica_id)
        if mine:
            decisions.extend(_decide_gpu(gpu, mine, config, now_s))
    return decisions


def _decide_gpu(gpu: GpuView, replicas: list[ReplicaView], config: PolicyConfig, now_s: float) -> list[Decision]:
    out: list[Decision] = []
    total = gpu.total_bytes
    known = gpu.known and total > 0
    projected = gpu.used_bytes

    def share(nbytes: int) -> float | None:
        return nbytes / total if known else None

    for r in replicas:
        forced = r.pin.mode
        if forced is None or forced is r.mode:
            continue
        delta = r.context_bytes if forced is MemoryMode.STATIC else -r.context_bytes
        before, projected = projected, projected + delta
        state = f"{gpu.uuid} at {share(before):.1%}" if known else f"{gpu.uuid} unknown (probe failed)"
        out.append(
            Decision(
                r.replica_id,
                gpu.uuid,
                forced,
                f"pinned {r.pin.value} in the config: {r.mode.value} -> {forced.value}, "
                f"{'takes' if delta > 0 else 'frees'} {_gib(abs(delta))}; {state}",
                delta,
                share(before),
                share(projected),
            )
        )
    if not known:
        return out

    target_bytes = config.target_bytes(total)
    auto = [r for r in replicas if r.pin is Pin.AUTO and _dwell_ok(r, config, now_s)]

    if gpu.used_bytes > config.high_watermark * total:
        page_outs, projected = _page_out_cold(gpu, replicas, projected, target_bytes, config)
        out.extend(page_outs)
        candidates = [r for r in auto if r.mode is MemoryMode.STATIC and r.context_bytes > 0]
        candidates.sort(key=lambda r: (_cost_per_byte(r, config), -r.context_bytes, r.replica_id))
        for r in candidates:
            if projected <= target_bytes:
                break
            before, projected = projected, projected - r.context_bytes
            cost_gib = _cost_per_byte(r, config) * GiB
            out.append(
                Decision(
                    r.replica_id,
                    gpu.uuid,
                    MemoryMode.DYNAMIC,
                    f"{gpu.uuid} at {before / total:.1%} ({_gib(before)} of {_gib(total)}) is above the high "
                    f"watermark {config.high_watermark:.0%}: going dynamic frees {_gib(r.context_bytes)} at "
                    f"{cost_gib * 1e3:.3f} ms/s per GiB ({_cost_text(r, config)}); projected {projected / total:.1%}, "
                    f"target {target_bytes / total:.1%}",
                    -r.context_bytes,
                    before / total,
                    projected / total,
                )
            )
    elif gpu.used_bytes < config.low_watermark * total:
        candidates = [r for r in auto if r.mode is MemoryMode.DYNAMIC]
        candidates.sort(key=lambda r: (-_benefit(r, config), r.context_bytes, r.replica_id))
        for r in candidates:
            if projected + r.context_bytes > target_bytes:
                continue
            before, projected = projected, projected + r.context_bytes
            out.append(
                Decision(
                    r.replica_id,
                    gpu.uuid,
                    MemoryMode.STATIC,
                    f"{gpu.uuid} at {before / total:.1%} ({_gib(before)} of {_gib(total)}) is below the low "
                    f"watermark {config.low_watermark:.0%}: going static takes {_gib(r.context_bytes)} and saves "
                    f"{_benefit(r, config) * 1e3:.3f} ms/s ({_cost_text(r, config)}); projected "
                    f"{projected / total:.1%}, target {target_bytes / total:.1%}",
                    r.context_bytes,
                    before / total,
                    projected / total,
                )
            )
    return out


def _page_out_cold(gpu: GpuView, replicas: list[ReplicaView], projected: int, target_bytes: int,
                   config: PolicyConfig) -> tuple[list[Decision], int]:
    """Rule 3a: cold weights, longest idle first, until projected use ≤ the target; one
    decision per replica naming its models. Returns the decisions and the projection."""
    total = gpu.total_bytes
    cold = sorted(((m, r) for r in replicas for m in r.cold_models if m.weights_bytes > 0),
                  key=lambda mr: (-mr[0].idle_s, -mr[0].weights_bytes, mr[1].replica_id, mr[0].name))
    chosen: dict[str, list[ColdModel]] = {}
    start = projected
    for m, r in cold:
        if projected <= target_bytes:
            break
        chosen.setdefault(r.replica_id, []).append(m)
        projected -= m.weights_bytes
    out = []
    before = start
    for r in replicas:
        models = chosen.get(r.replica_id)
        if not models:
            continue
        freed = sum(m.weights_bytes for m in models)
        after = before - freed
        names = ", ".join(f"{m.name} ({m.weights_bytes / MiB:.0f} MiB, idle {m.idle_s:.0f} s)" for m in models)
        out.append(Decision(
            r.replica_id, gpu.uuid, None,
            f"{gpu.uuid} at {before / total:.1%} ({_gib(before)} of {_gib(total)}) is above the high watermark "
            f"{config.high_watermark:.0%}: paging out cold weights frees {_gib(freed)} ({names}; each pays one "
            f"page-in on its next call, no hot traffic slows); projected {after / total:.1%}, "
            f"target {target_bytes / total:.1%}",
            -freed, before / total, after / total, tuple(m.name for m in models)))
        before = after
    return out, projected


def admission_capacity(gpu: GpuView, replicas: Sequence[ReplicaView], config: PolicyConfig) -> int | None:
    """Bytes the dynamic calls on ``gpu`` may hold at once (the shared budget's capacity).

    ::

        capacity = max(0, usable_bytes − used_bytes + held_by_dynamic_calls)
        usable_bytes = total − min(headroom_bytes, total / 20)

    The budget exists to prevent out-of-memory errors, so it follows what the card
    really has free, not the policy's target: the target decides *modes* (how much
    to leave for others), while a call that fits in free memory should run rather
    than get a 503. NVML's ``used`` already counts what dynamic calls in flight hold,
    so that is added back: the budget covers all dynamic calls, those running
    included. The two figures are read at slightly different moments; the headroom
    absorbs the difference (and the allocator's rounding). ``None`` for an unknown
    GPU: keep the budget as it is rather than guess.
    """
    if not gpu.known or gpu.total_bytes <= 0:
        return None
    held = sum(
        max(0, r.context_bytes_held)
        for r in replicas
        if r.alive and r.gpu_uuid == gpu.uuid and r.mode is MemoryMode.DYNAMIC
    )
    return max(0, config.usable_bytes(gpu.total_bytes) - gpu.used_bytes + held)


def _round_up(nbytes: int, unit: int) -> int:
    return -(-nbytes // unit) * unit


def pool_target_bytes(
    gpu: GpuView,
    pool_bytes: int,
    config: PolicyConfig,
    max_bytes: int | None,
    *,
    replicas: Sequence[ReplicaView],
    chunk_bytes: int,
) -> int | None:
    """Bytes the GPU's context pool should hold (a multiple of ``chunk_bytes``), or
    ``None`` to leave it as it is (unknown GPU).

    ``replicas`` are the ones leasing from this pool, in the modes the coordinator
    wants them in; ``pool_bytes`` is what the pool holds now (NVML counts it in
    ``used_bytes``, free chunks included). Each replica's context is rounded up to
    whole chunks, as its leases are::

        floor   = Σ contexts of static replicas (standing leases)
                  + the largest dynamic context (one call must always fit)
        ceiling = min(Σ every replica's context, max_bytes)
                  (all of them calling at once: a larger pool is never used)
        used ≤ target × total  →  grow into the room:  pool + (target − used)
        used > high watermark  →  shrink by the excess: pool − (used − target)
        otherwise              →  hold (hysteresis, as for modes)
        result = min(ceiling, max(floor, that))

    Pressure from other processes raises ``used`` like any other, so the pool gives
    back free chunks to them. The floor wins over pressure (the mode policy frees
    standing leases by sending static replicas dynamic, which lowers it); ``max_bytes``,
    the operator's cap, wins over the floor.
    """
    if not gpu.known or gpu.total_bytes <= 0:
        return None
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: expected > 0, got {chunk_bytes}")
    mine = [r for r in replicas if r.alive and r.gpu_uuid == gpu.uuid]
    contexts = {r.replica_id: _round_up(max(0, r.context_bytes), chunk_bytes) for r in mine}
    static = sum(contexts[r.replica_id] for r in mine if r.mode is MemoryMode.STATIC)
    largest_dynamic = max((contexts[r.replica_id] for r in mine if r.mode is MemoryMode.DYNAMIC), default=0)
    ceiling = sum(contexts.values())
    if max_bytes is not None:
        ceiling = min(ceiling, max_bytes // chunk_bytes * chunk_bytes)
    floor = min(static + largest_dynamic, ceiling)
    target = config.target_bytes(gpu.total_bytes)
    if gpu.used_bytes <= target:
        want = pool_bytes + (target - gpu.used_bytes)
    elif gpu.used_bytes > config.high_watermark * gpu.total_bytes:
        want = pool_bytes - (gpu.used_bytes - target)
    else:
        want = pool_bytes
    # Rounded down: growth stays under the target, a shrink frees at least the excess.
    want = max(0, want) // chunk_bytes * chunk_bytes
    return min(ceiling, max(floor, want))
