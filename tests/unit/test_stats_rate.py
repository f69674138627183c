"""A replica's request rate is measured at any rate: the mode policy ranks replicas on it."""

from __future__ import annotations

import pytest

from engine_runtime import stats
from engine_runtime.stats import EngineStats


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(stats.time, "monotonic", c)
    return c


def arrive(s: EngineStats, clock: Clock, rate_per_s: float, seconds: float) -> None:
    n = int(rate_per_s * seconds)
    for _ in range(n):
        clock.t += 1.0 / rate_per_s
        s.call_started()
        s.call_finished("ok", None, 0.0)


@pytest.mark.parametrize("rate", [2.0, 100.0, 409.6, 1000.0, 5000.0])
def test_the_rate_follows_the_arrivals_above_the_old_cap(clock, rate):
    s = EngineStats()
    arrive(s, clock, rate, EngineStats.RATE_WINDOW_S)  # a full window at this rate
    # Before: capped at 4096 arrivals per 10 s window (409.6/s).
    assert s.snapshot().request_rate_per_s == pytest.approx(rate, rel=0.06)


def test_the_rate_forgets_arrivals_older_than_the_window(clock):
    s = EngineStats()
    arrive(s, clock, 1000.0, 5.0)
    clock.t += EngineStats.RATE_WINDOW_S + 1.0
    assert s.snapshot().request_rate_per_s == 0.0
    arrive(s, clock, 10.0, EngineStats.RATE_WINDOW_S)
    assert s.snapshot().request_rate_per_s == pytest.approx(10.0, rel=0.06)


def test_two_replicas_at_different_high_rates_rank_by_rate(clock):
    busy, busier = EngineStats(), EngineStats()
    for _ in range(10):  # interleaved over one window, both above 409.6/s
        arrive(busy, clock, 600.0, 0.5)
        arrive(busier, clock, 2400.0, 0.5)
    assert busier.snapshot().request_rate_per_s > 2 * busy.snapshot().request_rate_per_s
