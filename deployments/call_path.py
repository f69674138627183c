"""Where a replica's call spends its time, stage by stage (pure; no Ray).

The serving path's latency is the sum of pieces no single figure shows: a request
waits for its batch, the batch waits for the replica's GPU thread, the engine runs,
and the result waits to be picked up by the event loop again. ``CallPath`` keeps the
last ``window`` samples of each stage so that ``status()`` (and ``bench_serving``)
can say which piece grew, instead of one end-to-end number nobody can act on.

Stages (milliseconds):

``queued``       a request's arrival in ``infer`` to its engine call being handed to
                 the GPU thread (Serve's batch wait, earlier groups of the batch)
``to_thread``    handed to the GPU thread to running there
``engine``       the engine call itself (inputs to the device, run, outputs back)
``from_thread``  the engine call's end to the event loop resuming the batch
``replica``      arrival in ``infer`` to its answer (what Serve's handle call adds
                 on top is the transport)
"""

from __future__ import annotations

import threading
from collections import deque

from engine_runtime.stats import percentile

__all__ = ["STAGES", "CallPath"]

STAGES = ("queued", "to_thread", "engine", "from_thread", "replica")


class CallPath:
    """Bounded samples per stage; ``record`` from any thread, ``summary`` for status."""

    def __init__(self, window: int = 2048) -> None:
        if window < 1:
            raise ValueError(f"CallPath window must be at least 1 sample, got {window}")
        self._lock = threading.Lock()
        self._samples = {stage: deque(maxlen=window) for stage in STAGES}
        self._counts = dict.fromkeys(STAGES, 0)

    def record(self, stage: str, seconds: float) -> None:
        if stage not in self._samples:
            raise ValueError(f"unknown call-path stage {stage!r}; stages: {list(STAGES)}")
        with self._lock:
            self._samples[stage].append(seconds * 1e3)
            self._counts[stage] += 1

    def reset(self) -> None:
        """Drop the window's samples (the counts since the start stay): a benchmark's
        next row then reads only its own calls."""
        with self._lock:
            for samples in self._samples.values():
                samples.clear()

    def summary(self) -> dict[str, dict[str, float | int]]:
        """``{stage: {"count", "p50_ms", "p99_ms", "mean_ms"}}`` over the window (stages
        with no sample are left out); ``count`` is every sample since the start."""
        with self._lock:
            snap = {stage: list(s) for stage, s in self._samples.items() if s}
            counts = dict(self._counts)
        return {stage: {"count": counts[stage], "p50_ms": round(percentile(ms, 0.5), 4),
                        "p99_ms": round(percentile(ms, 0.99), 4), "mean_ms": round(sum(ms) / len(ms), 4)}
                for stage, ms in snap.items()}
