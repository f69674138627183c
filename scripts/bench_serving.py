"""The serving path against the GPU: Triton's perf_analyzer over HTTP (JSON and binary)
and gRPC at concurrency 1..64, beside the in-process engine (the ceiling), and a small
request's p99 alone vs with large JSON bodies in flight (issue 14), those sent by
client processes of their own, so that the small request's timer shares no GIL with them.

On the GPU machine (perf_analyzer installed: ``pip install perf-analyzer``; the binary
is ``perf_analyzer/bin/perf_analyzer`` inside the package):

    python scripts/bench_serving.py                      # starts Ebb itself: ResNet-50 + BERT-base
    python scripts/bench_serving.py --url 127.0.0.1:8000 --grpc-url 127.0.0.1:9000 --model r50

Without perf_analyzer (a CPU host) it drives the same three protocols with
tritonclient for a few seconds each, on a 32-pixel ResNet-18: a smoke run, no claims.
Prints a table (targets met / not met; a benchmark asserts nothing), writes
``bench_serving.json`` and ``bench_serving.png`` to ``--out-dir`` (docs/results).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_path
from benchlib import ROOT, percentile, write_json
from serving_app import ImageModel, app_config, start_app
from serving_report import plot, tables, target_rows

PROTOCOLS = ("http-json", "http-binary", "grpc")


# -- the ceiling: the engine in this process ------------------------------------------------


def engine_ceiling(gpu: bool, image: ImageModel, batch: int, calls: int) -> dict[str, float]:
    """Requests/s of the same model and batch run back to back in this process (numpy in and out)."""
    from engine_runtime.backends.pytorch import PyTorchEngine

    engine = PyTorchEngine.from_architecture("r50", image.arch, max_batch=image.max_batch, opt_batch=image.opt_batch,
                                             image_size=image.size, mode="static", device="cuda" if gpu else "cpu")
    x = image.sample(batch)
    try:
        engine.warm()
        for _ in range(10):
            engine.infer({"input": x})
        latencies = []
        t0 = time.perf_counter()
        for _ in range(calls):
            start = time.perf_counter()
            engine.infer({"input": x})
            latencies.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - t0
    finally:
        engine.close()
        if gpu:
            import torch

            torch.cuda.empty_cache()
    return {"requests_per_s": calls / elapsed, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3}


# -- perf_analyzer -------------------------------------------------------------------------


def find_perf_analyzer() -> str | None:
    spec = importlib.util.find_spec("perf_analyzer")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "perf_analyzer"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("perf_analyzer")


def run_perf_analyzer(binary: str, protocol: str, url: str, model: str, batch: int, concurrency: int,
                      measurement_ms: int) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency; its CSV row as figures."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "pa.csv"
        cmd = [binary, "-m", model, "-u", url, "-i", "grpc" if protocol == "grpc" else "http",
               "-b", str(batch), "--concurrency-range", f"{concurrency}:{concurrency}",
               "--measurement-interval", str(measurement_ms), "--stability-percentage", "25",
               "--max-trials", "6", "-f", str(csv_path),
               # perf_analyzer's default input is random bytes, which as FP32 include NaN
               # and inf: Ebb refuses those (400, reject_non_finite), as the H200 run of
               # 2026-12-02 showed for every row. Zeros are finite and the same size.
               "--input-data", "zero"]
        if protocol.startswith("http"):
            fmt = "json" if protocol == "http-json" else "binary"
            cmd += ["--input-tensor-format", fmt, "--output-tensor-format", fmt]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0 or not csv_path.is_file():
            return {"error": (proc.stdout[-800:] + proc.stderr[-800:]).strip(), "command": " ".join(cmd)}
        with open(csv_path, newline="") as f:
            row = next(csv.DictReader(f))
    try:
        infer_per_s = float(row["Inferences/Second"])
        return {"requests_per_s": infer_per_s / batch, "p50_ms": float(row["p50 latency"]) / 1e3,
                "p99_ms": float(row["p99 latency"]) / 1e3, "command": " ".join(cmd), "csv": row}
    except (KeyError, ValueError) as err:
        return {"error": f"perf_analyzer's CSV lacks {err}: {row}", "command": " ".join(cmd)}


def check_endpoints(http_url: str, grpc_url: str, model: str) -> dict[str, str]:
    """What perf_analyzer reads before it sends a request: metadata, config, statistics,
    over HTTP and gRPC. A failure here names the endpoint instead of a perf_analyzer error."""
    import tritonclient.http as h

    clients = [("http", h.InferenceServerClient(http_url))]
    checks = {}
    try:
        import tritonclient.grpc as g

        clients.append(("grpc", g.InferenceServerClient(grpc_url)))
    except ImportError as err:
        checks["grpc"] = f"failed: {err}"
    for label, client in clients:
        for what, call in (("metadata", client.get_model_metadata), ("config", client.get_model_config),
                           ("stats", client.get_inference_statistics)):
            try:
                call(model)
                checks[f"{label} {what}"] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                checks[f"{label} {what}"] = f"failed: {str(exc)[:120]}"
    return checks


# -- tritonclient (the CPU smoke, and the small-request scenario) ---------------------------


def _client_call(protocol: str, http_url: str, grpc_url: str, model: str, x: np.ndarray, name: str = "input"):
    """A function making one infer call with its own client (one client per thread)."""
    if protocol == "grpc":
        import tritonclient.grpc as g

        client = g.InferenceServerClient(grpc_url)
        inp = g.InferInput(name, list(x.shape), _datatype(x))
        inp.set_data_from_numpy(x)
        return lambda: client.infer(model, [inp])
    import tritonclient.http as h

    binary = protocol == "http-binary"
    client = h.InferenceServerClient(http_url, network_timeout=300, connection_timeout=300)
    inp = h.InferInput(name, list(x.shape), _datatype(x))
    inp.set_data_from_numpy(x, binary_data=binary)
    output = h.InferRequestedOutput("output", binary_data=binary)
    return lambda: client.infer(model, [inp], outputs=[output] if binary else None)


def _datatype(x: np.ndarray) -> str:
    return {"float32": "FP32", "int64": "INT64", "int32": "INT32"}[str(x.dtype)]


def run_tritonclient(protocol: str, http_url: str, grpc_url: str, model: str, x: np.ndarray, concurrency: int,
                     duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def worker() -> None:
        call = _client_call(protocol, http_url, grpc_url, model, x)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a measured outcome
                with lock:
                    errors.append(str(exc)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    result = {"requests_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1e3,
              "p99_ms": percentile(latencies, 0.99) * 1e3}
    if errors:
        result["error"] = f"{len(errors)} failed: {errors[0]}"
    return result


def _large_body(name: str, x: np.ndarray) -> bytes:
    """The KServe v2 JSON body tritonclient's ``infer`` sends for ``x`` as a JSON tensor
    with no outputs named (it then asks for binary outputs): byte for byte the same."""
    request = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": _datatype(x),
                           "data": x.ravel().tolist()}],
               "parameters": {"binary_data_output": True}}
    return json.dumps(request, separators=(",", ":")).encode()


def _large_sender(index: int, http_url: str, model: str, name: str, batch: int, image: ImageModel, stop: Any,
                  answered: Any, reports: Any) -> None:
    """One large-body client in a process of its own (``small_behind_large``): encodes its
    JSON body once, then POSTs the same bytes over one keep-alive connection until ``stop``.
    Counts answers by status (and failed sends by exception); the counts, and any error
    that ended it, go back on ``reports``."""
    import http.client

    statuses: dict[str, int] = {}
    body = b""
    error = None
    conn = None
    try:
        body = _large_body(name, image.sample(batch))
        host, port = http_url.rsplit(":", 1)
        headers = {"Content-Type": "application/json"}
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=300)
            try:
                conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                key = str(response.status)
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                key = f"error: {type(exc).__name__}"
                conn.close()
                conn = None
                stop.wait(0.2)  # a refused connection is counted, not spun on
            statuses[key] = statuses.get(key, 0) + 1
            answered[index] += 1
    except BaseException as exc:  # noqa: BLE001 - reported in the result
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if conn is not None:
            conn.close()
        reports.put({"index": index, "statuses": statuses, "body_bytes": len(body), "error": error})


def _stop_senders(senders: dict[int, Any], reports: Any, stop: Any, timeout_s: float) -> dict[int, dict]:
    """Tells the sender processes to stop, collects their reports, joins them; one still
    running after ``timeout_s`` (a request in flight) is terminated, then killed."""
    import queue

    stop.set()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(senders) and time.monotonic() < deadline:
        try:
            report = reports.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in senders.values()):
                break
            continue
        got[report["index"]] = report
    while True:  # what a sender put just before it exited
        try:
            report = reports.get_nowait()
        except queue.Empty:
            break
        got[report["index"]] = report
    for index, p in senders.items():
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
        if index not in got:
            got[index] = {"index": index, "statuses": {}, "body_bytes": 0,
                          "error": f"no report; exit code {p.exitcode}"}
    return got


def small_behind_large(http_url: str, gpu: bool, image: ImageModel, small_calls: int, large_senders: int,
                       large_batch: int, start_timeout_s: float = 300.0) -> dict[str, Any]:
    """p50/p99 of a small encoder request (JSON) alone, then while clients keep large
    ResNet JSON bodies in flight.

    The large-body clients are separate OS processes ("spawn"), each encoding its JSON
    body once and then POSTing the same bytes with http.client, as separate client
    programs would. They were threads of this process, each building its body with
    tritonclient on every call (``tolist`` and a JSON encode of 1.2 M floats: close to a
    second in one C call, the GIL held): the small request's timing thread waited for the
    GIL, and the loaded p99 measured the benchmark's own client, not the server. Answers
    other than 200, and a sender that fails, are reported (``large_statuses``,
    ``large_non_200``, ``sender_errors``), not hidden."""
    import multiprocessing

    seq = 96 if gpu else 16
    ids = np.random.default_rng(0).integers(0, 1000, (1, seq), dtype=np.int64)

    def measure() -> list[float]:
        call = _client_call("http-json", http_url, "", "bert", ids, name="input_ids")
        out = []
        for _ in range(small_calls):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)
        return out

    alone = measure()
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    answered = ctx.Array("q", max(large_senders, 1), lock=False)
    reports = ctx.Queue()
    senders: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for i in range(large_senders):
            p = ctx.Process(target=_large_sender, name=f"large-sender-{i}", daemon=True,
                            args=(i, http_url, "r50", "input", large_batch, image, stop, answered, reports))
            try:
                p.start()
            except Exception as exc:  # noqa: BLE001 - reported in the result
                errors.append(f"sender {i}: did not start: {type(exc).__name__}: {exc}"[:300])
                continue
            senders[i] = p
        # Every sender has had an answer (or has ended) before the timer starts.
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and any(answered[i] == 0 and p.is_alive() for i, p in senders.items()):
            time.sleep(0.05)
        waiting = [i for i, p in senders.items() if answered[i] == 0 and p.is_alive()]
        if waiting:
            errors.extend(f"sender {i}: no answer within {start_timeout_s:.0f} s" for i in waiting)
        before = sum(answered)
        loaded = measure()
        while_timed = sum(answered) - before
    finally:
        got = _stop_senders(senders, reports, stop, timeout_s=330.0)
    statuses: dict[str, int] = {}
    for i, report in sorted(got.items()):
        for key, n in report["statuses"].items():
            statuses[key] = statuses.get(key, 0) + n
        if report["error"]:
            errors.append(f"sender {i}: {report['error']}")
    body_bytes = max((r["body_bytes"] for r in got.values()), default=0)
    answers = sum(n for key, n in statuses.items() if key.isdigit())
    return {"alone_p50_ms": statistics.median(alone) * 1e3, "alone_p99_ms": percentile(alone, 0.99) * 1e3,
            "loaded_p50_ms": statistics.median(loaded) * 1e3, "loaded_p99_ms": percentile(loaded, 0.99) * 1e3,
            "large_bodies_sent": answers, "large_body_mib": round(body_bytes / 2**20, 1),
            "large_senders": large_senders, "senders": "processes, body encoded once",
            "large_statuses": dict(sorted(statuses.items())),
            "large_non_200": {k: n for k, n in sorted(statuses.items()) if k != "200"},
            "large_answered_while_timed": while_timed, "sender_errors": errors}


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="HTTP host:port of a running app (default: start one)")
    parser.add_argument("--grpc-url", help="gRPC host:port of a running app")
    parser.add_argument("--model", default="r50", help="image model's name in the app")
    parser.add_argument("--batch", type=int, default=1, help="batch per request")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated concurrencies")
    parser.add_argument("--measurement-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    parser.add_argument("--ceiling-calls", type=int, default=300, help="in-process engine calls timed")
    parser.add_argument("--small-calls", type=int, default=200, help="small requests timed per phase")
    parser.add_argument("--large-senders", type=int, default=4, help="clients sending large JSON bodies")
    parser.add_argument("--large-batch", type=int, default=8, help="images per large JSON body")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: seconds per protocol, two concurrencies")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated, of " + ", ".join(PROTOCOLS))
    parser.add_argument("--ingress-replicas", type=int, default=None, help="EbbIngress replicas (default 2 on a GPU)")
    parser.add_argument("--model-replicas", type=int, default=1, help="replicas of each model (they share the card)")
    parser.add_argument("--batch-wait-s", type=float, default=0.002,
                        help="the models' batch_wait_timeout_s (0: take what is queued, wait for nothing)")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS): clients skip the proxy; "
                             "one ingress replica listening on ports of its own, which the script finds")
    parser.add_argument("--embed", action="store_true",
                        help="the image model inside the ingress replica (args.embed): no hop between them")
    parser.add_argument("--image-arch", help="the image model's architecture (pool-linear: the serving path alone)")
    parser.add_argument("--image-size", type=int, help="the image model's side in pixels")
    parser.add_argument("--access-log", action="store_true", help="Serve's access log on (a line per request)")
    parser.add_argument("--separate-loop", action="store_true",
                        help="the ingress's code on Serve's second event loop (Serve's default; cluster.yaml "
                             "runs it on Serve's own loop)")
    parser.add_argument("--no-small", action="store_true", help="skip the small-behind-large measurement")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the cluster this script starts (Ray Serve's RAY_SERVE_* "
                             "settings reach every process: proxy, controller, replicas); repeatable")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args(argv)
    protocols_asked = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(protocols_asked) - set(PROTOCOLS))
    if unknown:
        parser.error(f"--protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")
    serve_env = {}
    for item in args.serve_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("RAY_"):
            parser.error(f"--serve-env {item!r}: expected RAY_...=VALUE")
        serve_env[key] = value
    if (serve_env or args.direct_ingress) and args.url is not None:
        parser.error("--serve-env and --direct-ingress apply to the cluster this script starts, not --url's")
    direct = None
    if args.direct_ingress:
        if args.ingress_replicas not in (None, 1):
            parser.error("--direct-ingress: one ingress replica (perf_analyzer reaches one port; Serve's "
                         "load balancer for several is HAProxy, not on these machines)")
        args.ingress_replicas = 1
        direct = (_free_port(), _free_port())
        serve_env.update(serving_path.direct_ingress_env(*direct))
    os.environ.update(serve_env)  # before ray.init: the local cluster's processes inherit it

    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    binary = find_perf_analyzer()
    claims = binary is not None and gpu and not args.quick
    concurrencies = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.ceiling_calls, args.small_calls, args.large_senders, args.large_batch = 30, 20, 2, 4

    print(f"in-process engine ({'GPU' if gpu else 'CPU'}), batch {args.batch} ...", flush=True)
    image = ImageModel.choose(gpu, args.image_arch, args.image_size, args.batch)
    ceiling = engine_ceiling(gpu, image, args.batch, args.ceiling_calls)
    http_url, grpc_url = args.url, args.grpc_url
    if http_url is None:
        http_port, grpc_port = _free_port(), _free_port()
        if args.model_replicas < 1 or (args.ingress_replicas is not None and args.ingress_replicas < 1):
            parser.error("--model-replicas and --ingress-replicas must be at least 1")
        start_app(app_config(gpu, http_port, grpc_port, image,
                             ingress_replicas=args.ingress_replicas, model_replicas=args.model_replicas,
                             batch_wait_s=args.batch_wait_s, embed=args.embed,
                             access_log=args.access_log, same_loop=not args.separate_loop),
                  wait_ready=direct is None)
        if direct is not None:
            http_port, grpc_port = serving_path.direct_ports(*direct)
            print(f"direct ingress: HTTP on {http_port}, gRPC on {grpc_port}", flush=True)
        http_url, grpc_url = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    grpc_url = grpc_url or http_url.rsplit(":", 1)[0] + ":9000"

    preflight = check_endpoints(http_url, grpc_url, args.model)
    print(f"endpoints perf_analyzer reads: {preflight}", flush=True)
    path = None
    if args.url is None:
        print("the call path, one caller straight to the model deployment ...", flush=True)
        path = (serving_path.probe(args.model, image.sample(args.batch), calls=50 if args.quick else 300)
                if not args.embed else None)  # no deployment of its own to call
    protocols: dict[str, dict[str, Any]] = {}
    for protocol in protocols_asked:
        protocols[protocol] = {}
        for c in concurrencies:
            print(f"{protocol} concurrency {c} ...", flush=True)
            if claims:
                r = run_perf_analyzer(binary, protocol, grpc_url if protocol == "grpc" else http_url, args.model,
                                      args.batch, c, args.measurement_ms)
            else:
                r = run_tritonclient(protocol, http_url, grpc_url, args.model, image.sample(args.batch), c,
                                     duration_s=2.0 if args.quick else 10.0)
            if args.url is None:
                r["replica_path"] = serving_path.replica_timings(args.model, embedded=args.embed)
            protocols[protocol][str(c)] = r
    small = None
    if not args.no_small:
        print("small requests alone, then behind large JSON bodies ...", flush=True)
        small = small_behind_large(http_url, gpu, image, args.small_calls, args.large_senders, args.large_batch)

    results = {"driver": "perf_analyzer" if claims else "tritonclient (smoke)", "claims": claims,
               "preflight": preflight,
               "gpu": gpu, "model": args.model, "image_model": vars(image), "batch": args.batch, "ceiling": ceiling,
               "protocols": protocols, "small_behind_large": small, "perf_analyzer": binary,
               "serve_env": serve_env, "call_path": path, "direct_ingress": direct is not None,
               "replicas": {"ingress": args.ingress_replicas or (2 if gpu and not args.embed else 1),
                            "model": args.model_replicas}, "embed": args.embed,
               "access_log": args.access_log, "ingress_same_loop": not args.separate_loop,
               "batch_wait_s": args.batch_wait_s}
    results["targets"] = target_rows(results)
    out_dir = Path(args.out_dir)
    name = "bench_serving" if claims else "bench_serving_smoke"
    write_json(out_dir, f"{name}.json", results)
    plot(results, out_dir / f"{name}.png")
    print(tables(results))
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.png')}")
    if args.url is None:
        from ray import serve

        serve.shutdown()
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
