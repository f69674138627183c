"""Per-engine accounting: bytes held, acquisitions and their cost, calls by outcome.

Read by the coordinator (which replica frees most for least latency), by metrics and
by the status view; written on every acquisition and call, so updates are O(1).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from engine_runtime.memory import MemoryMode


__all__ = ["CallTimes", "EngineStats", "StatsSnapshot", "percentile", "time_calls"]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank below; 0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class CallTimes:
    """Wall-clock times of back-to-back calls, as :func:`time_calls` measured them."""

    calls: int
    warmup: int
    p50_s: float
    p99_s: float
    mean_s: float
    samples_s: tuple[float, ...]


def time_calls(call: Callable[[], object], calls: int = 100, warmup: int = 10) -> CallTimes:
    """Ebb's one way of timing a call: ``warmup`` untimed calls, then ``calls`` timed
    back to back, each on its own (``time.perf_counter`` around the call and nothing
    else: no memory reading, no output check inside the timed loop).

    ``call`` must return only once its work is done (``engine.infer`` does: it
    synchronises before it returns). ``scripts/bench_modes.py`` and the GPU tests time
    with this, so a figure from one is the figure from the other (issue 14); before,
    each had its own loop, one reading NVML between calls, and their figures for the
    same model differed.
    """
    if calls < 1 or warmup < 0:
        raise ValueError(f"time_calls needs calls >= 1 and warmup >= 0, got calls={calls}, warmup={warmup}")
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return CallTimes(calls, warmup, statistics.median(samples), percentile(samples, 0.99),
                     statistics.fmean(samples), tuple(samples))


@dataclass
class StatsSnapshot:
    """A copy of an engine's figures at one moment; plain data, safe to send anywhere."""

    weights_bytes: int
    context_bytes_held: int
    peak_context_bytes: int
    last_context_bytes: int
    acquisitions: int
    acquisition_p50_s: float
    acquisition_p99_s: float
    acquisition_total_s: float
    calls_ok: int
    calls_invalid: int
    calls_unavailable: int
    calls_failed: int
    calls_in_flight: int
    latency_p50_s: dict[str, float] = field(default_factory=dict)
    latency_p99_s: dict[str, float] = field(default_factory=dict)
    request_rate_per_s: float = 0.0
    #: Dynamic calls whose admission had to wait for bytes (or for their turn).
    admission_waits: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class EngineStats:
    """Thread-safe counters; ``snapshot()`` copies them out."""

    #: Latency samples kept per mode for percentiles; small so snapshots stay cheap.
    WINDOW = 256
    #: Seconds over which the request rate is computed.
    RATE_WINDOW_S = 10.0

    def __init__(self, weights_bytes: int = 0) -> None:
        self._lock = threading.Lock()
        self.weights_bytes = weights_bytes
        self.context_bytes_held = 0
        self.peak_context_bytes = 0
        self.last_context_bytes = 0
        self.acquisitions = 0
        self._acq = deque(maxlen=self.WINDOW)
        self._acq_total = 0.0
        self.calls = {"ok": 0, "invalid": 0, "unavailable": 0, "failed": 0}
        self.in_flight = 0
        self.admission_waits = 0
        self._lat: dict[MemoryMode, deque] = {m: deque(maxlen=self.WINDOW) for m in MemoryMode}
        self._arrivals = _RateCounter(self.RATE_WINDOW_S)

    def acquired(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.context_bytes_held += nbytes
            self.last_context_bytes = nbytes
            self.peak_context_bytes = max(self.peak_context_bytes, self.context_bytes_held)
            self.acquisitions += 1
            self._acq.append(seconds)
            self._acq_total += seconds

    def admission_waited(self) -> None:
        with self._lock:
            self.admission_waits += 1

    def acquisition_durations_since(self, seen: int) -> tuple[int, list[float]]:
        """``(acquisitions now, durations of those after the first seen)``, for metrics
        that observe each acquisition once; at most the window's worth come back."""
        with self._lock:
            new = max(0, self.acquisitions - seen)
            samples = list(self._acq)[-new:] if new else []
            return self.acquisitions, samples

    def released(self, nbytes: int) -> None:
        with self._lock:
            self.context_bytes_held -= nbytes

    def call_started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self._arrivals.add(time.monotonic())

    def call_finished(self, outcome: str, mode: MemoryMode | None, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.calls[outcome] += 1
            if outcome == "ok" and mode is not None:
                self._lat[mode].append(seconds)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            rate = self._arrivals.rate_per_s(time.monotonic())
            acq = list(self._acq)
            lat = {m.value: list(v) for m, v in self._lat.items()}
            return StatsSnapshot(
                weights_bytes=self.weights_bytes,
                context_bytes_held=self.context_bytes_held,
                peak_context_bytes=self.peak_context_bytes,
                last_context_bytes=self.last_context_bytes,
                acquisitions=self.acquisitions,
                acquisition_p50_s=percentile(acq, 0.5),
                acquisition_p99_s=percentile(acq, 0.99),
                acquisition_total_s=self._acq_total,
                calls_ok=self.calls["ok"],
                calls_invalid=self.calls["invalid"],
                calls_unavailable=self.calls["unavailable"],
                calls_failed=self.calls["failed"],
                calls_in_flight=self.in_flight,
                latency_p50_s={m: percentile(v, 0.5) for m, v in lat.items() if v},
                latency_p99_s={m: percentile(v, 0.99) for m, v in lat.items() if v},
                request_rate_per_s=rate,
                admission_waits=self.admission_waits,
            )


class _RateCounter:
    """Arrivals per second over a sliding window, at any rate, in constant memory.

    A ring of per-interval counters (``slots`` intervals of ``window_s / slots``): an
    arrival adds one to the current interval's counter. A bounded list of timestamps
    (the earlier ``deque(maxlen=4096)``) capped the rate it could report at
    4096 / window (409.6/s over 10 s), and the mode policy ranks replicas on it.
    """

    def __init__(self, window_s: float, slots: int = 20) -> None:
        self.width_s = float(window_s) / slots
        self._ids = [-1] * slots  # which interval each slot counts
        self._counts = [0] * slots

    def add(self, now: float) -> None:
        interval = int(now // self.width_s)
        slot = interval % len(self._ids)
        if self._ids[slot] != interval:
            self._ids[slot], self._counts[slot] = interval, 0
        self._counts[slot] += 1

    def rate_per_s(self, now: float) -> float:
        """Arrivals in the intervals of the window (the current one partly elapsed), per second."""
        current = int(now // self.width_s)
        n = len(self._ids)
        total = sum(c for i, c in zip(self._ids, self._counts) if 0 <= current - i < n)
        covered_s = (n - 1) * self.width_s + (now - current * self.width_s)
        return total / covered_s if covered_s > 0 else 0.0
