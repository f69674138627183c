"""Where a served call's time goes, for bench_serving: the replica's own stages
(``ModelDeployment.timings``, ``deployments.call_path``) and Serve's transport measured
beside it (a handle round trip that does no work, and the same infer through a handle
by reference, i.e. Ray's object store, and by value over Serve's replica gRPC).

With several replicas of the model, the stages are one replica's (the one Serve's
router picks for the ``timings`` call).

Needs a running app (``bench_serving.start_app``) and this process connected to it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchlib import percentile


def _timed(fn, calls: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return {"p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3, "calls": calls}


def replica_timings(model: str, app: str = "ebb", reset: bool = True) -> dict[str, Any]:
    """The model replica's call-path summary since the last reset (then reset)."""
    from ray import serve

    try:
        return serve.get_deployment_handle(model, app_name=app).timings.remote(reset).result(timeout_s=30)
    except Exception as exc:  # noqa: BLE001 - a figure missing, said so
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def probe(model: str, x: np.ndarray, calls: int = 200, app: str = "ebb") -> dict[str, Any]:
    """One caller, back to back, straight to the model deployment (no ingress, no proxy)."""
    from ray import serve

    handle = serve.get_deployment_handle(model, app_name=app)
    replica_timings(model, app)  # a window of these calls only
    out: dict[str, Any] = {"handle ready (no work)": _timed(lambda: handle.ready.remote().result(), calls)}
    out["handle infer (by reference)"] = _timed(lambda: handle.infer.remote({"input": x}).result(), calls)
    out["replica stages (by reference)"] = replica_timings(model, app)
    try:
        by_value = handle.options(_by_reference=False)
        out["handle infer (by value, replica gRPC)"] = _timed(
            lambda: by_value.infer.remote({"input": x}).result(), calls)
    except Exception as exc:  # noqa: BLE001 - Serve without by-value handles
        out["handle infer (by value, replica gRPC)"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def table_rows(path: dict[str, Any]) -> list[list[str]]:
    """Rows for a markdown table: what, p50 ms, p99 ms."""
    rows = []
    for what, r in path.items():
        if what.startswith("replica stages"):
            for stage, s in (r.items() if isinstance(r, dict) and "error" not in r else []):
                rows.append([f"  in the replica: {stage}", f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}"])
        elif "error" in r:
            rows.append([what, r["error"], ""])
        else:
            rows.append([what, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}"])
    return rows
