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

#: Ports tried above each direct-ingress base (Serve allocates the replica's from there).
DIRECT_PORT_SPAN = 16


def direct_ingress_env(http_base: int, grpc_base: int) -> dict[str, str]:
    """Ray Serve's direct ingress: each ingress replica also serves HTTP and gRPC, past
    the proxy, on ports Serve allocates from these bases (``ray/serve/_private/constants.py``)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_base),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_base + DIRECT_PORT_SPAN),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_base),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_base + DIRECT_PORT_SPAN)}


def direct_ports(http_base: int, grpc_base: int, timeout_s: float = 600.0) -> tuple[int, int]:
    """The ingress replica's HTTP and gRPC ports under direct ingress, once it answers ready."""
    import requests
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout_s
    http_port = grpc_port = None
    while time.monotonic() < deadline and (http_port is None or grpc_port is None):
        for port in range(http_base, http_base + DIRECT_PORT_SPAN):
            try:
                if http_port is None and requests.get(f"http://127.0.0.1:{port}/v2/health/ready",
                                                      timeout=2).status_code == 200:
                    http_port = port
            except requests.RequestException:
                pass
        for port in range(grpc_base, grpc_base + DIRECT_PORT_SPAN):
            if grpc_port is not None:
                break
            try:
                if grpcclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_live(client_timeout=2):
                    grpc_port = port
            except Exception:  # noqa: BLE001 - nothing there (yet)
                pass
        time.sleep(0.5)
    if http_port is None or grpc_port is None:
        raise TimeoutError(f"direct ingress: no ingress replica answered on HTTP {http_base}-"
                           f"{http_base + DIRECT_PORT_SPAN} (found {http_port}) or gRPC {grpc_base}-"
                           f"{grpc_base + DIRECT_PORT_SPAN} (found {grpc_port}) within {timeout_s:.0f} s")
    return http_port, grpc_port


def _timed(fn, calls: int, warmup: int = 20) -> dict[str, float]:
    """Ebb's one timing method (``engine_runtime.stats.time_calls``), as milliseconds."""
    from engine_runtime.stats import time_calls

    t = time_calls(fn, calls=calls, warmup=warmup)
    return {"p50_ms": t.p50_s * 1e3, "p99_ms": t.p99_s * 1e3, "calls": calls}


def replica_timings(model: str, app: str = "ebb", reset: bool = True, embedded: bool = False) -> dict[str, Any]:
    """The model replica's call-path summary since the last reset (then reset); ``embedded``:
    the model runs inside the ingress replica (``args.embed``), which answers for it."""
    from ray import serve

    try:
        return serve.get_deployment_handle("EbbIngress" if embedded else model,
                                           app_name=app).timings.remote(reset).result(timeout_s=30)
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
