"""Ebb's demo: deploy ``cluster.yaml`` on a local Ray cluster and show it working.

Starts Ray (with one logical GPU when the host has none, so fractional-GPU replicas
schedule as they would on a card), deploys the Ebb application from the config
file, sends one request over HTTP (Open Inference Protocol) and one through a
deployment handle, prints the answers and each replica's mode and memory, then keeps
serving until Ctrl-C (or exits at once with ``--once``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from engine_runtime.units import MiB


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s (last error: {last})")


def _http_infer(url: str, model: str, name: str, x: np.ndarray) -> dict:
    body = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _status(url: str) -> dict:
    with urllib.request.urlopen(url + "/ebb/status", timeout=10) as r:
        return json.loads(r.read())


def print_status(status: dict) -> None:
    for gpu in status.get("gpus", []):
        kind = "logical GPU (accounted)" if gpu["virtual"] else "GPU"
        pressure = "unknown" if gpu["pressure"] is None else f"{gpu['pressure']:.1%}"
        budget = "unset" if gpu["budget_bytes"] is None else f"{gpu['budget_bytes'] / MiB:,.0f} MiB"
        print(f"  {kind} {gpu['gpu']}: {gpu['used_bytes'] / MiB:,.0f} of {gpu['total_bytes'] / MiB:,.0f} MiB "
              f"({pressure}), admission budget {budget}")
        for r in gpu["replicas"]:
            print(f"    {r['model']:<10} replica {r['replica_id']:<10} pid {r['pid']:<7} mode {r['mode']:<8} "
                  f"weights {r['weights_bytes'] / MiB:6.1f} MiB  context held {r['held_bytes'] / MiB:6.1f} MiB "
                  f"(of {r['context_bytes'] / MiB:.1f})  via {r['mechanism']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cluster.yaml", help="Serve config file (default: cluster.yaml)")
    parser.add_argument("--once", action="store_true", help="exit after the demo requests instead of serving")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    import ray
    from ray import serve

    from deployments.app import from_serve_config

    app_name, route_prefix, app, http_options = from_serve_config(args.config)
    host = http_options.get("host", "127.0.0.1")
    port = args.port or int(http_options.get("port", 8000))
    if _port_in_use(host, port):
        # Checked before Ray starts: Serve's proxy would otherwise fail to bind in the
        # background and the demo would only time out waiting for it.
        print(f"demo: {host}:{port} is in use (another Serve application, say one started with "
              f"`ray start` and `serve run`); stop it (`serve shutdown`) or pass --port N", file=sys.stderr)
        return 2
    gpus = _gpu_count()
    print(f"Starting Ray with {gpus or 1} {'GPU(s)' if gpus else 'logical GPU (no GPU on this host)'} ...")
    # address="local": a cluster of the demo's own, also where `ray start` runs one here
    # (ray.init() would join that one and refuse num_gpus; the demo must not touch it).
    ray.init(address="local", num_gpus=None if gpus else 1, num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    stop = {"now": False}
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"Deploying application {app_name!r} from {args.config} ...")
        serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
        url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        _wait_ready(url, timeout_s=300)

        with urllib.request.urlopen(url + "/v2/models/resnet18", timeout=10) as r:
            meta = json.loads(r.read())
        shape = [1] + [d for d in meta["inputs"][0]["shape"][1:]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        t0 = time.perf_counter()
        answer = _http_infer(url, "resnet18", meta["inputs"][0]["name"], x)
        http_ms = (time.perf_counter() - t0) * 1e3
        logits = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
        top = np.argsort(logits)[::-1][:5]
        print(f"\nHTTP  POST {url}/v2/models/resnet18/infer  ({http_ms:.0f} ms)")
        print("  top-5 classes:", ", ".join(f"{i} ({logits[i]:+.3f})" for i in top))

        handle = serve.get_deployment_handle("resnet18", app_name=app_name)
        t0 = time.perf_counter()
        out = handle.infer.remote({meta["inputs"][0]["name"]: x}).result()
        handle_ms = (time.perf_counter() - t0) * 1e3
        same = np.allclose(out["output"][0], logits, atol=1e-5)
        print(f"\nHandle  resnet18.infer.remote(...)  ({handle_ms:.0f} ms): output {out['output'].shape}, "
              f"same answer as HTTP: {same}")

        time.sleep(1.0)  # one report round, so the status shows the calls just made
        print("\nReplicas, their memory mode and memory (from the coordinator):")
        print_status(_status(url))
        print(f"\nServing at {url} (Open Inference Protocol; status at {url}/ebb/status).")
        if args.once:
            return 0 if same else 1
        print("Ctrl-C to stop.")
        # Explicit handlers: a shell that starts the demo in the background leaves SIGINT
        # ignored, and Python then raises no KeyboardInterrupt.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.update(now=True))
        while not stop["now"]:
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nStopping: Serve shuts replicas down (each releases its memory), then Ray.")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
