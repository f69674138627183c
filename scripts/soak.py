"""Soak: HTTP and handle traffic from several threads while memory modes switch every
few seconds; every request accounted for, latency bounded, memory back to baseline.

    python scripts/soak.py --duration-s 600          # the long form (prints a table last)

The short form runs in CI as ``tests/integration/test_soak.py``, which calls
:class:`Soak` on its own cluster. Modes switch by pressure: every ``--switch-every-s``
the coordinator is told that another process holds ``--pressure`` of the logical GPU
(``inject_external_bytes``, the only pressure a logical GPU has), or nothing; both
models have ``pin: auto``, so each switch moves them between static and dynamic.

Each request carries an id (``{channel}-{thread}-{n}``) and is recorded exactly once,
with its outcome: ``ok`` (the answer equals the reference for its input), a
documented error (HTTP 503 for no context memory in time or a replica gone, or
``ContextMemoryUnavailable`` through a handle), or anything else, which the caller
treats as a failure. Not part of Ebb itself.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import MiB  # noqa: E402

IMAGE = (3, 32, 32)
SEQ_LEN = 16
INPUT_NAMES = {"resnet18": "input", "encoder": "input_ids"}
DATATYPES = {"resnet18": "FP32", "encoder": "INT64"}
#: Outcomes a client may get and Ebb documents (README, docs/reliability.md).
DOCUMENTED = ("ok", "http 503 context memory unavailable", "http 503 model replica unavailable",
              "handle ContextMemoryUnavailable")
#: Distinct inputs per model; each request sends one of them and is checked against its reference.
INPUTS_PER_MODEL = 4
RTOL, ATOL = 1e-4, 1e-5


def soak_args(virtual_gpu_bytes: int = 2 << 30) -> dict[str, Any]:
    """Ebb's args for the soak: ResNet-18 at 32x32 and BERT-tiny, both ``pin: auto``, starting static."""
    def model(name: str, arch: str, shape: dict) -> dict:
        return {"name": name, "source": {"architecture": arch, "seed": 0},
                "input": {"min_batch": 1, "opt_batch": 4, "max_batch": 4, **shape},
                "backend": "pytorch", "mode": "static", "pin": "auto", "lazy": False,
                "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005}}

    return {
        "model_dirs": ["."],
        "http": {"max_body_bytes": 1 << 20, "retry_after_s": 1},
        "coordinator": {"poll_interval_s": 0.2, "min_dwell_s": 0.5, "admission_deadline_s": 2.0,
                        "virtual_gpu_memory_bytes": virtual_gpu_bytes},
        "models": [model("resnet18", "resnet18", {"image_size": 32}), model("encoder", "bert-tiny", {"seq_len": 16})],
    }


def make_inputs(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "resnet18": [rng.random((1 + i % 2, *IMAGE), dtype=np.float32) for i in range(INPUTS_PER_MODEL)],
        "encoder": [rng.integers(0, 1000, (1 + i % 2, SEQ_LEN), dtype=np.int64) for i in range(INPUTS_PER_MODEL)],
    }


@dataclass
class Record:
    channel: str
    model: str
    start_s: float
    latency_s: float
    outcome: str


@dataclass
class Ledger:
    """Every request sent and its one answer; a second answer for an id is kept apart."""

    sent: dict[str, tuple[str, str]] = field(default_factory=dict)
    answered: dict[str, Record] = field(default_factory=dict)
    doubles: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, request_id: str, channel: str, model: str) -> None:
        with self.lock:
            if request_id in self.sent:
                raise RuntimeError(f"request id {request_id} sent twice")
            self.sent[request_id] = (channel, model)

    def answer(self, request_id: str, record: Record) -> None:
        with self.lock:
            if request_id in self.answered:
                self.doubles.append(request_id)
            else:
                self.answered[request_id] = record


class Soak:
    """Closed-loop traffic (each thread sends its next request when the last is answered)
    over HTTP and handles, with a thread that switches the GPU's pressure."""

    def __init__(self, url: str, handles: dict[str, Any], coordinator: Any, gpu: str, *,
                 http_threads: int = 3, handle_threads: int = 3, switch_every_s: float = 3.0,
                 pressure: float = 0.93, virtual_gpu_bytes: int = 2 << 30, request_timeout_s: float = 120.0):
        self.url, self.handles, self.coordinator, self.gpu = url, handles, coordinator, gpu
        self.http_threads, self.handle_threads = http_threads, handle_threads
        self.switch_every_s, self.request_timeout_s = switch_every_s, request_timeout_s
        self.pressure_bytes = int(pressure * virtual_gpu_bytes)
        self.inputs = make_inputs()
        self.references: dict[str, list[np.ndarray]] = {}
        self.ledger = Ledger()
        self.pressure_changes = 0
        self._stop = threading.Event()

    # -- views --------------------------------------------------------------------

    def status(self, model: str) -> dict[str, Any]:
        return self.handles[model].status.remote().result(timeout_s=30)

    def gpu_view(self) -> dict[str, Any]:
        import ray

        view = ray.get(self.coordinator.status.remote(), timeout=30)
        return next(g for g in view["gpus"] if g["gpu"] == self.gpu)

    def decisions(self) -> int:
        import ray

        return sum(ray.get(self.coordinator.status.remote(), timeout=30)["decisions_by_reason"].values())

    def inject(self, nbytes: int) -> None:
        import ray

        ray.get(self.coordinator.inject_external_bytes.remote(gpu_uuid=self.gpu, nbytes=int(nbytes)), timeout=30)

    def wait_modes(self, mode: str, timeout_s: float = 60.0) -> dict[str, dict]:
        """Wait until every model's replica is in ``mode`` with no call in flight; return their statuses."""
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = {m: self.status(m) for m in self.handles}
            if all(s["mode"] == mode and s["stats"]["calls_in_flight"] == 0 for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas not all {mode} and idle after {timeout_s} s: "
                                   f"{ {m: (s['mode'], s['stats']['calls_in_flight']) for m, s in statuses.items()} }")
            time.sleep(0.1)

    def memory(self, statuses: dict[str, dict]) -> dict[str, Any]:
        from engine_runtime.memory.admission import SharedBudget

        budget = SharedBudget(key=self.gpu)
        try:
            snap = budget.snapshot()
        finally:
            budget.close()
        return {
            "coordinator_used_bytes": self.gpu_view()["used_bytes"],
            "held_bytes": {m: s["stats"]["context_bytes_held"] for m, s in statuses.items()},
            "budget_used_bytes": snap.used_bytes, "budget_holders": snap.holders,
            "rss_bytes": {m: _rss_bytes(s["pid"]) for m, s in statuses.items()},
            "pids": {m: s["pid"] for m, s in statuses.items()},
        }

    # -- the run ------------------------------------------------------------------

    def run(self, duration_s: float) -> dict[str, Any]:
        self.inject(0)
        before_statuses = self.wait_modes("static")
        for model, xs in self.inputs.items():
            name = INPUT_NAMES[model]
            self.references[model] = [self.handles[model].infer.remote({name: x}).result(timeout_s=60)["output"]
                                      for x in xs]
        baseline = self.memory(self.wait_modes("static"))
        decisions_before = self.decisions()
        workers = [threading.Thread(target=self._http_loop, args=(i,), name=f"soak-http-{i}", daemon=True)
                   for i in range(self.http_threads)]
        workers += [threading.Thread(target=self._handle_loop, args=(i,), name=f"soak-handle-{i}", daemon=True)
                    for i in range(self.handle_threads)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        pressure_on = False
        try:
            while time.monotonic() - t0 < duration_s:
                self._stop.wait(min(self.switch_every_s, max(0.0, duration_s - (time.monotonic() - t0))))
                if time.monotonic() - t0 >= duration_s:
                    break
                pressure_on = not pressure_on
                self.inject(self.pressure_bytes if pressure_on else 0)
                self.pressure_changes += 1
        finally:
            self._stop.set()
            for w in workers:
                w.join(timeout=self.request_timeout_s + 30)
        wall_s = time.monotonic() - t0
        hung = [w.name for w in workers if w.is_alive()]
        switches = self.decisions() - decisions_before

        # Memory: every replica dynamic and idle holds no context memory...
        self.inject(self.pressure_bytes)
        dynamic = self.memory(self.wait_modes("dynamic"))
        # ...and with the pressure gone, every figure is back where it started.
        self.inject(0)
        after = self.memory(self.wait_modes("static"))
        return self._report(wall_s, duration_s, hung, switches, baseline, dynamic, after,
                            restarts={m: before_statuses[m]["pid"] != after["pids"][m] for m in self.handles})

    def _pick(self, model: str, n: int) -> tuple[int, np.ndarray]:
        i = n % INPUTS_PER_MODEL
        return i, self.inputs[model][i]

    def _check(self, model: str, i: int, out: np.ndarray) -> str:
        ref = self.references[model][i]
        if out.shape != ref.shape or not np.allclose(out, ref, rtol=RTOL, atol=ATOL):
            return "wrong answer"
        return "ok"

    def _http_loop(self, thread: int) -> None:
        import requests

        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            model = ("resnet18", "encoder")[(n + thread) % 2]
            i, x = self._pick(model, n)
            request_id = f"http-{thread}-{n}"
            n += 1
            self.ledger.send(request_id, "http", model)
            body = {"id": request_id, "inputs": [{"name": INPUT_NAMES[model], "shape": list(x.shape),
                                                  "datatype": DATATYPES[model], "data": x.ravel().tolist()}]}
            t0 = time.monotonic()
            try:
                resp = session.post(f"{self.url}/v2/models/{model}/infer", json=body, timeout=self.request_timeout_s)
                answer = resp.json()
                if resp.status_code == 200:
                    if answer.get("id") != request_id:
                        outcome = f"answer for {answer.get('id')!r}"
                    else:
                        (out,) = answer["outputs"]
                        got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
                        outcome = self._check(model, i, got)
                else:
                    outcome = _http_error_class(resp.status_code, answer.get("error", ""))
            except Exception as err:  # noqa: BLE001 - a timeout or a broken connection is an outcome
                outcome = f"client {type(err).__name__}"
            self.ledger.answer(request_id, Record("http", model, t0, time.monotonic() - t0, outcome))

    def _handle_loop(self, thread: int) -> None:
        n = 0
        while not self._stop.is_set():
            model = ("encoder", "resnet18")[(n + thread) % 2]
            i, x = self._pick(model, n)
            request_id = f"handle-{thread}-{n}"
            n += 1
            self.ledger.send(request_id, "handle", model)
            t0 = time.monotonic()
            try:
                out = self.handles[model].infer.remote({INPUT_NAMES[model]: x}).result(
                    timeout_s=self.request_timeout_s)
                outcome = self._check(model, i, out["output"])
            except Exception as err:  # noqa: BLE001 - classified: documented or not
                outcome = f"handle {type(err).__name__}"
            self.ledger.answer(request_id, Record("handle", model, t0, time.monotonic() - t0, outcome))

    def _report(self, wall_s, duration_s, hung, switches, baseline, dynamic, after, restarts) -> dict[str, Any]:
        records = list(self.ledger.answered.values())
        by_outcome = Counter(r.outcome for r in records)
        latency = {}
        for channel in ("http", "handle"):
            values = [r.latency_s for r in records if r.channel == channel]
            latency[channel] = {"p50_s": benchlib.percentile(values, 0.5), "p99_s": benchlib.percentile(values, 0.99),
                                "max_s": max(values, default=float("nan"))}
        return {
            "duration_s": duration_s, "wall_s": wall_s, "threads": {"http": self.http_threads,
                                                                    "handle": self.handle_threads},
            "sent": len(self.ledger.sent), "answered": len(self.ledger.answered),
            "lost": sorted(set(self.ledger.sent) - set(self.ledger.answered)),
            "answered_twice": list(self.ledger.doubles),
            "by_outcome": dict(by_outcome),
            "undocumented": {k: v for k, v in by_outcome.items() if k not in DOCUMENTED},
            "latency": latency, "pressure_changes": self.pressure_changes, "mode_switches": switches,
            "hung_threads": hung, "restarts": restarts,
            "memory": {"baseline": baseline, "all_dynamic_after": dynamic, "after": after},
        }


def _http_error_class(status: int, message: str) -> str:
    if status == 503 and "context memory unavailable" in message:
        return "http 503 context memory unavailable"
    if status == 503 and "model replica unavailable" in message:
        return "http 503 model replica unavailable"
    return f"http {status}: {message[:80]}"


def _rss_bytes(pid: int) -> int | None:
    """Resident memory of a local process (None when it is on another node or gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def table(report: dict[str, Any]) -> str:
    mem = report["memory"]
    rows = [
        ["wall time", f"{report['wall_s']:.1f} s"],
        ["threads (http / handle)", f"{report['threads']['http']} / {report['threads']['handle']}"],
        ["requests sent / answered", f"{report['sent']} / {report['answered']}"],
        ["lost / answered twice / hung threads",
         f"{len(report['lost'])} / {len(report['answered_twice'])} / {len(report['hung_threads'])}"],
        *[[f"outcome: {k}", v] for k, v in sorted(report["by_outcome"].items())],
        ["pressure changes / mode switches", f"{report['pressure_changes']} / {report['mode_switches']}"],
        *[[f"latency {c} p50 / p99 / max", f"{v['p50_s'] * 1e3:.0f} / {v['p99_s'] * 1e3:.0f} / {v['max_s'] * 1e3:.0f} ms"]
          for c, v in report["latency"].items()],
        ["coordinator used (start -> end)", f"{mem['baseline']['coordinator_used_bytes'] / MiB:.1f} -> "
                                            f"{mem['after']['coordinator_used_bytes'] / MiB:.1f} MiB"],
        ["context held, all dynamic and idle", ", ".join(f"{m} {b} B" for m, b in
                                                         mem["all_dynamic_after"]["held_bytes"].items())],
        ["context held static (start -> end)", ", ".join(
            f"{m} {mem['baseline']['held_bytes'][m] / MiB:.1f} -> {b / MiB:.1f} MiB"
            for m, b in mem["after"]["held_bytes"].items())],
        ["budget used (end)", f"{mem['after']['budget_used_bytes']} B"],
        ["replica RSS (start -> end)", ", ".join(
            f"{m} {(mem['baseline']['rss_bytes'][m] or 0) / MiB:.0f} -> {(b or 0) / MiB:.0f} MiB"
            for m, b in mem["after"]["rss_bytes"].items())],
        ["replicas restarted", ", ".join(m for m, r in report["restarts"].items() if r) or "none"],
    ]
    return benchlib.markdown_table(["soak", "figure"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="how long traffic runs")
    parser.add_argument("--switch-every-s", type=float, default=3.0, help="how often the pressure flips")
    parser.add_argument("--http-threads", type=int, default=3)
    parser.add_argument("--handle-threads", type=int, default=3)
    parser.add_argument("--port", type=int, default=18498, help="Serve's HTTP port (on 127.0.0.1)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from deployments.app import bind
    from deployments.config import parse_app_config
    from deployments.coordinator import get_existing

    benchlib.start_ray()
    node_id = ray.get_runtime_context().get_node_id()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        cfg = parse_app_config(soak_args())
        options = {m.name: {"num_replicas": 1, "max_ongoing_requests": 16,
                            "ray_actor_options": {"num_gpus": 0.25, "num_cpus": 0.25}} for m in cfg.models}
        serve.run(bind(cfg, options), name="ebb", route_prefix="/", blocking=False)
        handles = {m.name: serve.get_deployment_handle(m.name, app_name="ebb") for m in cfg.models}
        gpu = handles["resnet18"].status.remote().result(timeout_s=120)["gpu"]
        deadline = time.monotonic() + 60
        while True:
            try:
                coordinator = get_existing(cfg.coordinator.namespace)
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        soak = Soak(f"http://127.0.0.1:{args.port}", handles, coordinator, gpu,
                    http_threads=args.http_threads, handle_threads=args.handle_threads,
                    switch_every_s=args.switch_every_s, virtual_gpu_bytes=cfg.coordinator.virtual_gpu_memory_bytes)
        report = soak.run(args.duration_s)
        report["machine"] = f"{os.cpu_count()} CPU cores, {benchlib.card_name()}"
        if args.out is not None:
            benchlib.write_json(args.out.parent, args.out.name, report)
        print(table(report))
        return 0 if not (report["lost"] or report["answered_twice"] or report["undocumented"]
                         or report["hung_threads"]) else 1
    finally:
        serve.shutdown()
        ray.shutdown()
        # The per-GPU admission budgets live in /dev/shm, named after this node's GPUs.
        for path in glob.glob(f"/dev/shm/ebb-budget-*{node_id[:12]}*"):
            os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
