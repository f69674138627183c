"""deployments.call_path: bounded per-stage samples and their summary."""

from __future__ import annotations

import pytest

from deployments.call_path import STAGES, CallPath


def test_summary_reads_percentiles_in_milliseconds_over_the_window():
    path = CallPath(window=100)
    for i in range(1, 201):  # 1..200 ms; the window keeps the last 100
        path.record("engine", i / 1e3)
    s = path.summary()
    assert list(s) == ["engine"]
    assert s["engine"]["count"] == 200
    assert s["engine"]["p50_ms"] == pytest.approx(151.0)
    assert s["engine"]["p99_ms"] == pytest.approx(200.0)
    assert s["engine"]["mean_ms"] == pytest.approx(150.5)


def test_reset_empties_the_window_but_keeps_the_count():
    path = CallPath()
    path.record("queued", 0.001)
    path.reset()
    assert path.summary() == {}
    path.record("queued", 0.002)
    assert path.summary()["queued"]["count"] == 2
    assert path.summary()["queued"]["p50_ms"] == pytest.approx(2.0)


def test_an_unknown_stage_or_window_is_refused_by_name():
    with pytest.raises(ValueError, match="'parse'.*queued"):
        CallPath().record("parse", 0.1)
    with pytest.raises(ValueError, match="window must be at least 1"):
        CallPath(window=0)
    assert STAGES[-1] == "replica"
