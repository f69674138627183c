"""Pressure, mixed models, over HTTP: issue 12's scenario, with and without the pool.

Three ResNet-50 replicas (batch 12) and two BERT-base replicas (sequence 96), each at
``num_gpus: 0.2``, serve 10 HTTP clients (closed loop, KServe v2 binary tensors)
while another process takes the card to at least 96% in uneven steps, holds, frees
half, then all. The same scenario runs, one after the other in one Ray cluster, for:

- the pool on, initial mode static (``lazy: false``),
- the pool on, initial mode dynamic,
- the pool off, initial mode static (``lazy: false``): the baseline beside it.

Counted per configuration: whether the deploy succeeded, requests sent and answered,
failed (any non-200), HTTP 503 and 500, out-of-memory errors (an answer saying so),
the peak card use reached and every replica's mode over time. Prints a table and
writes ``bench_pressure_mixed.json`` and ``bench_pressure_mixed.png`` to ``--out-dir``
(default ``docs/results``).

    python scripts/bench_pressure.py --scenario mixed             # H200: < 9 minutes in all
    python scripts/bench_pressure.py --scenario mixed --quick     # CPU smoke (CI): logical GPU

On a host without a GPU the other process is the coordinator's
``inject_external_bytes`` on the logical GPU (the only pressure a logical GPU has),
with the same steps; the models are small and there is one replica of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import GiB, MiB, StatusPoller

HEADER_LENGTH = "Inference-Header-Content-Length"
#: The ramp: card shares to reach, and how long to stay at each (uneven on purpose).
RAMP = [(0.55, 2.0), (0.74, 3.5), (0.86, 1.5), (0.92, 4.0), (0.97, 2.5)]


@dataclass(frozen=True)
class Config:
    label: str
    pool: bool
    mode: str


CONFIGS = {
    "no-pool-static": Config("no pool, static (lazy: false)", False, "static"),
    "pool-static": Config("pool, static (lazy: false)", True, "static"),
    "pool-dynamic": Config("pool, dynamic", True, "dynamic"),
}


@dataclass
class Call:
    t: float
    model: str
    status: int  # HTTP status; 0: no answer (timeout, connection error)
    latency_s: float
    error: str = ""


@dataclass
class Outcome:
    config: str
    deploy_ok: bool
    deploy_error: str = ""
    calls: list[Call] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    peak_share: float = 0.0

    def summary(self) -> dict:
        st = [c.status for c in self.calls]
        ok = [c.latency_s for c in self.calls if c.status == 200]
        switches = 0
        last: dict[str, str] = {}
        for r in self.rows:
            if r["replica"] in last and last[r["replica"]] != r["mode"]:
                switches += 1
            last[r["replica"]] = r["mode"]
        return {
            "config": self.config, "deploy_ok": self.deploy_ok, "deploy_error": self.deploy_error[:300],
            "sent": len(st), "ok": st.count(200), "failed": sum(s != 200 for s in st),
            "http_503": st.count(503), "http_500": st.count(500), "no_answer": st.count(0),
            "oom": sum("out of memory" in c.error.lower() for c in self.calls),
            "peak_card_share": round(self.peak_share, 4), "mode_switches": switches,
            "p50_ms": benchlib.percentile(ok, 0.5) * 1e3, "p99_ms": benchlib.percentile(ok, 0.99) * 1e3,
            "errors": sorted({f"{c.status} {c.model}: {c.error[:160]}" for c in self.calls if c.status != 200})[:10],
        }


# -- the application -------------------------------------------------------------------


def app_args(cfg: Config, a) -> dict:
    models = [
        {"name": "resnet50", "source": {"architecture": a.vision_arch, "seed": 0},
         "input": {"min_batch": 1, "opt_batch": a.vision_batch, "max_batch": a.vision_batch,
                   "image_size": a.image_size},
         "backend": "pytorch", "mode": cfg.mode, "pin": "auto", "lazy": False,
         "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}},
        {"name": "bert", "source": {"architecture": a.text_arch, "seed": 0},
         "input": {"min_batch": 1, "opt_batch": 4, "max_batch": a.text_max_batch, "seq_len": a.seq_len},
         "backend": "pytorch", "mode": cfg.mode, "pin": "auto", "lazy": False,
         "batching": {"max_batch_size": a.text_max_batch, "batch_wait_timeout_s": 0.002}},
    ]
    args = {"models": models,
            "coordinator": {"poll_interval_s": 0.5, "min_dwell_s": a.min_dwell_s, "high_watermark": 0.90,
                            "low_watermark": 0.75, "target": 0.85, "admission_deadline_s": a.deadline_s,
                            "virtual_gpu_memory_bytes": a.virtual_gpu_bytes}}
    if cfg.pool:
        args["context_pool"] = {"enabled": True, "chunk_bytes": 64 * MiB}
    return args


def deployment_options(a) -> dict:
    gpu = {"num_gpus": a.num_gpus, "num_cpus": 0.1}
    return {"resnet50": {"num_replicas": a.vision_replicas, "max_ongoing_requests": 16, "ray_actor_options": gpu},
            "bert": {"num_replicas": a.text_replicas, "max_ongoing_requests": 16, "ray_actor_options": gpu},
            "EbbIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}}


def deploy(cfg: Config, a, name: str) -> str:
    """Deploy and wait until RUNNING; returns "" or why it did not get there."""
    from ray import serve

    from deployments.app import bind
    from deployments.config import parse_app_config

    app = bind(parse_app_config(app_args(cfg, a)), deployment_options(a))
    failure: list[str] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")
        except Exception as err:  # noqa: BLE001 - recorded as the deploy's outcome
            failure.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(a.deploy_timeout_s)
    if failure:
        return failure[0]
    if thread.is_alive():
        status = serve.status().applications.get(name)
        return f"not RUNNING after {a.deploy_timeout_s:.0f} s: {getattr(status, 'status', '?')} " \
               f"{getattr(status, 'message', '')}"[:600]
    return ""


# -- load: HTTP clients ------------------------------------------------------------------


def binary_request(x: np.ndarray, name: str, datatype: str) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


class Clients:
    """``n`` closed-loop HTTP clients, alternating between the two models."""

    def __init__(self, url: str, n: int, a, t0: float) -> None:
        rng = np.random.default_rng(0)
        image = rng.standard_normal((a.vision_batch, 3, a.image_size, a.image_size)).astype(np.float32)
        tokens = rng.integers(0, 1000, (a.text_batch, a.seq_len), dtype=np.int64)
        self.bodies = {"resnet50": binary_request(image, "input", "FP32"),
                       "bert": binary_request(tokens, "input_ids", "INT64")}
        self.url, self.t0, self.timeout_s = url, t0, a.deadline_s + 50
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=("resnet50" if i % 2 == 0 else "bert",),
                                          daemon=True) for i in range(n)]

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def _run(self, model: str) -> None:
        body, headers = self.bodies[model]
        session = requests.Session()
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                resp = session.post(f"{self.url}/v2/models/{model}/infer", data=body, headers=headers,
                                    timeout=self.timeout_s)
                status = resp.status_code
                error = "" if status == 200 else resp.text[:300]
            except requests.RequestException as err:
                status, error = 0, f"{type(err).__name__}: {err}"[:300]
            with self._lock:
                self.calls.append(Call(start - self.t0, model, status, time.perf_counter() - start, error))
            if status not in (200,):
                time.sleep(0.05)  # a client that got an error retries after a pause, as clients do

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        return self.calls


# -- the other process -------------------------------------------------------------------


class SteppedBallast:
    """Another process holding GPU memory in 256 MiB pieces: take more, free half, free all."""

    CODE = (
        "import sys, torch\n"
        "piece = 256 << 20\n"
        "held = []\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    cmd, *arg = line.split()\n"
        "    if cmd == 'take':\n"
        "        want = int(arg[0])\n"
        "        while want > 0:\n"
        "            n = min(piece, want)\n"
        "            try:\n"
        "                t = torch.empty(n, dtype=torch.uint8, device='cuda'); t.fill_(1)\n"
        "            except torch.OutOfMemoryError:\n"
        "                break\n"
        "            held.append(t); want -= n\n"
        "        torch.cuda.synchronize()\n"
        "    elif cmd == 'free_half':\n"
        "        total = sum(t.numel() for t in held); kept = 0; keep = []\n"
        "        for t in held:\n"
        "            if kept + t.numel() <= total // 2:\n"
        "                keep.append(t); kept += t.numel()\n"
        "        held = keep; torch.cuda.empty_cache()\n"
        "    elif cmd == 'free_all':\n"
        "        held = []; torch.cuda.empty_cache()\n"
        "    print('held', sum(t.numel() for t in held), flush=True)\n"
    )

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError("the ballast process did not start")

    def _say(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def take(self, nbytes: int) -> int:
        return self._say(f"take {max(0, int(nbytes))}")

    def free_half(self) -> int:
        return self._say("free_half")

    def free_all(self) -> int:
        return self._say("free_all")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Pressure:
    """The steps, on a card (the ballast, NVML) or on the logical GPU (the coordinator's injection)."""

    def __init__(self, coordinator, gpu_id: str, virtual: bool, sampler, virtual_bytes: int) -> None:
        self.coordinator, self.gpu_id, self.virtual, self.sampler = coordinator, gpu_id, virtual, sampler
        self.virtual_bytes = virtual_bytes
        self.injected = 0
        self.ballast = None if virtual else SteppedBallast()

    def used_total(self) -> tuple[int, int]:
        import ray

        if self.virtual:
            gpu = ray.get(self.coordinator.status.remote())["gpus"][0]
            return int(gpu["used_bytes"]), int(gpu["total_bytes"]) or self.virtual_bytes
        now = self.sampler.read()
        return now["used"], now["total"]

    def to_share(self, share: float) -> None:
        import ray

        used, total = self.used_total()
        need = int(share * total) - used
        if need <= 0:
            return
        if self.virtual:
            self.injected += need
            ray.get(self.coordinator.inject_external_bytes.remote(self.gpu_id, self.injected))
        else:
            self.ballast.take(need)

    def free_half(self) -> None:
        import ray

        if self.virtual:
            self.injected //= 2
            ray.get(self.coordinator.inject_external_bytes.remote(self.gpu_id, self.injected))
        else:
            self.ballast.free_half()

    def free_all(self) -> None:
        import ray

        if self.virtual:
            self.injected = 0
            ray.get(self.coordinator.inject_external_bytes.remote(self.gpu_id, 0))
        else:
            self.ballast.free_all()

    def close(self) -> None:
        if self.ballast is not None:
            self.ballast.close()


# -- one configuration ---------------------------------------------------------------------


def wait_registered(coordinator, n: int, timeout_s: float) -> dict:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        st = ray.get(coordinator.status.remote(), timeout=30)
        reps = [r for g in st["gpus"] for r in g["replicas"] if r.get("loaded")]
        if len(reps) >= n:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(reps)} of {n} replicas registered with the coordinator within {timeout_s} s")
        time.sleep(0.2)


def shut_pool_owner() -> None:
    """End this GPU's pool owner between configurations, so none starts with the last one's chunks."""
    try:
        import torch

        if not torch.cuda.is_available():
            return  # no GPU, no pool
        from engine_runtime import _cuda
        from engine_runtime.memory.pool import PoolPhysical
        from engine_runtime.memory.pool._wire import PoolPaths

        paths = PoolPaths.for_gpu(_cuda.device_uuid(0), None)
        if paths.socket.exists():
            with PoolPhysical(paths.socket, 0, retire_poll_s=None) as client:
                client.shutdown_owner()
    except Exception as err:  # noqa: BLE001 - no owner (or no GPU): nothing to end
        print(f"  (pool owner not shut down: {type(err).__name__}: {err})")


def run_config(key: str, a, url: str, name: str) -> Outcome:
    import ray
    from ray import serve

    from deployments.coordinator import get_existing

    cfg = CONFIGS[key]
    print(f"\n== {cfg.label}: deploying {a.vision_replicas} x {a.vision_arch} b{a.vision_batch} and "
          f"{a.text_replicas} x {a.text_arch} s{a.seq_len} at num_gpus {a.num_gpus}", flush=True)
    t_deploy = time.perf_counter()
    error = deploy(cfg, a, name)
    out = Outcome(cfg.label, not error, error)
    if error:
        print(f"   deploy failed: {error[:300]}", flush=True)
        serve.delete(name)
        return out
    n = a.vision_replicas + a.text_replicas
    coordinator = get_existing("ebb")
    st = wait_registered(coordinator, n, 120)
    print(f"   deployed in {time.perf_counter() - t_deploy:.0f} s", flush=True)
    gpu = st["gpus"][0]
    t0 = time.perf_counter()
    sampler = benchlib.NvmlSampler().start(t0)
    poller = StatusPoller(coordinator, t0, period_s=0.25).start()
    pressure = Pressure(coordinator, gpu["gpu"], gpu["virtual"], sampler, a.virtual_gpu_bytes)
    clients = Clients(url, a.clients, a, t0).start()
    try:
        def mark(what: str) -> None:
            out.events.append((time.perf_counter() - t0, what))

        time.sleep(a.warm_s * a.time_scale)
        for share, hold_s in RAMP:
            pressure.to_share(share)
            mark(f"to {share:.0%}")
            time.sleep(hold_s * a.time_scale)
            used, total = pressure.used_total()
            out.peak_share = max(out.peak_share, used / total)
        time.sleep(a.hold_s * a.time_scale)
        used, total = pressure.used_total()
        out.peak_share = max(out.peak_share, used / total)
        pressure.free_half()
        mark("free half")
        time.sleep(a.half_s * a.time_scale)
        pressure.free_all()
        mark("free all")
        time.sleep(a.after_s * a.time_scale)
    finally:
        out.calls = clients.stop()
        out.rows = poller.stop()
        out.samples = sampler.stop()
        if out.samples:
            out.peak_share = max(out.peak_share, max(s["used"] / s["total"] for s in out.samples))
        pressure.close()
        serve.delete(name)
        if cfg.pool:
            shut_pool_owner()
        # The next configuration starts with a coordinator of its own (no replicas of this one
        # in its view, no injected pressure left): its first replica creates it.
        ray.kill(coordinator, no_restart=True)
    s = out.summary()
    print(f"   {s['sent']} requests: {s['ok']} ok, {s['failed']} failed ({s['http_503']} x 503, "
          f"{s['http_500']} x 500, {s['oom']} OOM), peak card use {s['peak_card_share']:.1%}, "
          f"{s['mode_switches']} mode switches", flush=True)
    return out


# -- driver --------------------------------------------------------------------------------


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="issue 12's mixed pressure scenario, with and without the pool")
    p.add_argument("--quick", action="store_true", help="tiny CPU configuration (CI smoke, no claims)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--vision-arch", default="resnet50")
    p.add_argument("--vision-batch", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--text-arch", default="bert-base")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--text-batch", type=int, default=1, help="samples per BERT request")
    p.add_argument("--text-max-batch", type=int, default=8)
    p.add_argument("--vision-replicas", type=int, default=3)
    p.add_argument("--text-replicas", type=int, default=2)
    p.add_argument("--num-gpus", type=float, default=0.2)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--deadline-s", type=float, default=10.0, help="admission deadline: a call waits this long")
    p.add_argument("--min-dwell-s", type=float, default=2.0)
    p.add_argument("--warm-s", type=float, default=5.0)
    p.add_argument("--hold-s", type=float, default=10.0)
    p.add_argument("--half-s", type=float, default=6.0)
    p.add_argument("--after-s", type=float, default=8.0)
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies every phase")
    p.add_argument("--deploy-timeout-s", type=float, default=120.0)
    p.add_argument("--virtual-gpu-bytes", type=int, default=4 * GiB)
    p.add_argument("--http-port", type=int, default=18998)
    p.add_argument("--out-dir", default=str(benchlib.ROOT / "docs" / "results"))
    a = p.parse_args(argv)
    if a.quick:
        a.vision_arch, a.vision_batch, a.image_size = "resnet18", 2, 32
        a.text_arch, a.seq_len, a.text_max_batch = "bert-tiny", 16, 4
        a.vision_replicas = a.text_replicas = 1
        a.num_gpus, a.clients, a.time_scale, a.virtual_gpu_bytes = 0.25, 2, 0.25, 1 * GiB
        a.deadline_s, a.min_dwell_s = 5.0, 0.5
    unknown = [c for c in a.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    from ray import serve

    out_dir = Path(a.out_dir)
    started = time.perf_counter()
    benchlib.start_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": a.http_port})
    url = f"http://127.0.0.1:{a.http_port}"
    outcomes = []
    try:
        for i, key in enumerate(a.configs.split(",")):
            outcomes.append(run_config(key, a, url, f"mixed{i}"))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    summaries = [o.summary() for o in outcomes]
    benchlib.write_json(out_dir, "bench_pressure_mixed.json", {
        "card": benchlib.card_name(), "args": vars(a), "summaries": summaries,
        "runs": [{"config": o.config, "events": o.events, "status_rows": o.rows, "nvml": o.samples,
                  "calls": [vars(c) for c in o.calls]} for o in outcomes]})
    _plot(out_dir / "bench_pressure_mixed.png", outcomes)
    print(f"\nMixed pressure on {benchlib.card_name()} ({time.perf_counter() - started:.0f} s in all): "
          f"{a.vision_replicas} x {a.vision_arch} b{a.vision_batch} + {a.text_replicas} x {a.text_arch} "
          f"s{a.seq_len} at num_gpus {a.num_gpus}, {a.clients} HTTP clients")
    print(benchlib.markdown_table(
        ["configuration", "deploy", "requests", "ok", "failed", "503", "500", "OOM", "peak card use",
         "mode switches", "p50 / p99 ms"],
        [[s["config"], "ok" if s["deploy_ok"] else "FAILED", s["sent"], s["ok"], s["failed"], s["http_503"],
          s["http_500"], s["oom"], f"{s['peak_card_share']:.1%}", s["mode_switches"],
          f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f}"] for s in summaries]))
    for s in summaries:
        for e in ([s["deploy_error"]] if s["deploy_error"] else []) + s["errors"]:
            print(f"  {s['config']}: {e}")
    return 0


def _plot(path: Path, outcomes: list[Outcome]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, max(1, len(outcomes)), figsize=(6 * max(1, len(outcomes)), 9), squeeze=False)
    for col, o in enumerate(outcomes):
        ax = axes[0][col]
        if o.samples:
            ax.plot([s["t"] for s in o.samples], [s["used"] / s["total"] for s in o.samples], label="card (NVML)")
        elif o.rows:
            ts = sorted({r["t"] for r in o.rows})
            share = {r["t"]: r["used"] / r["total"] for r in o.rows if r["total"]}
            ax.plot(ts, [share.get(t, 0) for t in ts], label="logical GPU (accounted)")
        ax.axhline(0.96, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(o.config + ("" if o.deploy_ok else " (deploy FAILED)"))
        ax.set_ylabel("share of card in use")
        ax = axes[1][col]
        for i, rid in enumerate(sorted({r["replica"] for r in o.rows})):
            pts = [(r["t"], 1 if r["mode"] == "dynamic" else 0) for r in o.rows if r["replica"] == rid]
            ax.step([p[0] for p in pts], [p[1] + i * 0.04 for p in pts], where="post")
        ax.set_yticks([0, 1], ["static", "dynamic"])
        ax = axes[2][col]
        for status, color in ((200, "tab:blue"), (503, "orange"), (500, "red"), (0, "black")):
            pts = [c for c in o.calls if c.status == status]
            if pts:
                ax.scatter([c.t for c in pts], [c.latency_s * 1e3 for c in pts], s=3 if status == 200 else 12,
                           color=color, label=f"HTTP {status}" if status else "no answer")
        ax.set_ylabel("latency ms")
        ax.set_xlabel("seconds")
        ax.legend(loc="upper right", fontsize=7)
        for a in axes[:, col]:
            for t, what in o.events:
                a.axvline(t, color="grey", linewidth=0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
