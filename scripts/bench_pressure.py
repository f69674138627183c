"""Pressure: replicas serve steady traffic while another process takes, then frees, a
large share of the card. Reports reaction time (pressure over the high watermark ->
replicas switched to dynamic, and back), out-of-memory errors and failed requests;
plots card memory, each replica's mode and latency over time.

    python scripts/bench_pressure.py                 # GPU: ResNet-50, 4 replicas at 0.25 GPU
    python scripts/bench_pressure.py --quick         # CPU smoke (CI): logical GPU, injected pressure
    python scripts/bench_pressure.py --scenario mixed [--quick]   # issue 12: ResNet-50 + BERT over HTTP,
                                                     # pool on (static, dynamic) and off (scripts/pressure_mixed.py)

On a host without a GPU the "other process" is simulated with the coordinator's
``inject_external_bytes`` on the logical GPU (the only pressure a logical GPU has).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import GiB, MiB, StatusPoller  # noqa: E402


def app_config(args) -> dict:
    return {
        "models": [{
            "name": "m", "source": {"architecture": args.arch, "seed": 0},
            "input": {"min_batch": 1, "opt_batch": args.batch, "max_batch": args.batch, "image_size": args.image_size},
            "backend": "pytorch", "mode": "dynamic", "pin": "auto", "lazy": False,
            "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        }],
        "coordinator": {"poll_interval_s": args.poll_interval_s, "min_dwell_s": args.min_dwell_s,
                        "high_watermark": 0.90, "low_watermark": 0.75, "target": 0.85,
                        "admission_deadline_s": 10.0, "virtual_gpu_memory_bytes": args.virtual_gpu_bytes},
    }


def first_time_all(rows: list[dict], after_s: float, mode: str, replicas: set[str]) -> float | None:
    """First poll time after ``after_s`` at which every replica reports ``mode``."""
    by_t: dict[float, dict[str, str]] = {}
    for r in rows:
        if r["t"] >= after_s:
            by_t.setdefault(r["t"], {})[r["replica"]] = r["mode"]
    for t in sorted(by_t):
        seen = by_t[t]
        if replicas <= set(seen) and all(seen[x] == mode for x in replicas):
            return t
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--scenario" in argv:
        at = argv.index("--scenario")
        scenario = argv[at + 1] if at + 1 < len(argv) else ""
        del argv[at:at + 2]
        if scenario == "mixed":
            import pressure_mixed

            return pressure_mixed.main(argv)
        if scenario != "steady":
            raise SystemExit(f"--scenario: expected steady or mixed, got {scenario!r}")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU configuration (CI smoke, no timing claims)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--rate", type=float, default=40.0, help="calls per second, all replicas together")
    p.add_argument("--phase-s", type=float, default=10.0, help="length of each phase (before, during, after)")
    p.add_argument("--pressure-share", type=float, default=0.93, help="card share in use once the ballast holds")
    p.add_argument("--poll-interval-s", type=float, default=0.5)
    p.add_argument("--min-dwell-s", type=float, default=2.0)
    p.add_argument("--virtual-gpu-bytes", type=int, default=4 * GiB)
    p.add_argument("--out-dir", default="out")
    p.add_argument("--scenario", choices=["steady", "mixed"], default="steady",
                   help="mixed: issue 12's scenario (scripts/pressure_mixed.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.image_size, args.replicas = "resnet18", 2, 32, 2
        args.rate, args.phase_s, args.virtual_gpu_bytes = 10.0, 4.0, 1 * GiB

    import ray
    from ray import serve

    from deployments.app import bind
    from deployments.config import parse_app_config
    from deployments.coordinator import get_existing

    out_dir = Path(args.out_dir)
    benchlib.start_ray()
    cfg = parse_app_config(app_config(args))
    opts = {"m": {"num_replicas": args.replicas, "max_ongoing_requests": 64,
                  "ray_actor_options": {"num_gpus": round(1 / args.replicas, 4), "num_cpus": 0.1}}}
    serve.start(http_options={"host": "127.0.0.1", "port": 18999})
    serve.run(bind(cfg, opts), name="pressure", route_prefix="/pressure")
    handle = serve.get_deployment_handle("m", app_name="pressure")
    coordinator = get_existing(cfg.coordinator.namespace)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    for _ in range(2 * args.replicas):
        handle.infer.remote({"input": x}).result()

    # Wait until the coordinator has seen every replica (they start dynamic and go
    # static while the card has room).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = ray.get(coordinator.status.remote())
        reps = [r for g in st["gpus"] for r in g["replicas"]]
        if len(reps) == args.replicas and all(r["mode"] == "static" for r in reps):
            break
        time.sleep(0.2)
    gpu_id = st["gpus"][0]["gpu"]
    replica_ids = {r["replica_id"] for r in reps}
    virtual = st["gpus"][0]["virtual"]

    t0 = time.perf_counter()
    sampler = benchlib.NvmlSampler().start(t0)
    poller = StatusPoller(coordinator, t0).start()
    load: dict = {}
    total_s = 3 * args.phase_s
    loader = threading.Thread(target=lambda: load.update(results=benchlib.drive(
        [handle], {"input": x}, args.rate, total_s, timeout_s=60, t0=t0)))
    loader.start()
    time.sleep(args.phase_s)
    ballast = None
    if virtual:
        used = ray.get(coordinator.status.remote())["gpus"][0]["used_bytes"]
        extra = int(args.pressure_share * args.virtual_gpu_bytes) - used
        ray.get(coordinator.inject_external_bytes.remote(gpu_id, extra))
        t_on = time.perf_counter() - t0
    else:
        now = sampler.read()
        extra = int(args.pressure_share * now["total"]) - now["used"]
        ballast = benchlib.Ballast(extra)
        t_on = ballast.take() - t0
    time.sleep(args.phase_s)
    if virtual:
        ray.get(coordinator.inject_external_bytes.remote(gpu_id, 0))
        t_off = time.perf_counter() - t0
    else:
        t_off = ballast.release() - t0
    loader.join()
    time.sleep(2 * args.poll_interval_s + args.min_dwell_s)
    rows = poller.stop()
    samples = sampler.stop()
    results = load["results"]

    t_dyn = first_time_all(rows, t_on, "dynamic", replica_ids)
    t_static = first_time_all(rows, t_off, "static", replica_ids)
    summary = benchlib.summarize(results)
    failed = sum(v for k, v in summary["outcomes"].items() if k != "ok")
    report = {
        "card": benchlib.card_name(), "args": vars(args), "pressure_bytes": extra, "t_pressure_on_s": t_on,
        "t_pressure_off_s": t_off, "t_all_dynamic_s": t_dyn, "t_all_static_s": t_static,
        "reaction_to_dynamic_s": None if t_dyn is None else t_dyn - t_on,
        "reaction_to_static_s": None if t_static is None else t_static - t_off,
        "summary": summary, "failed_requests": failed, "oom_errors": summary["outcomes"].get("oom", 0),
        "errors": [r.detail for r in results if r.outcome != "ok"][:10],
    }
    benchlib.write_json(out_dir, "bench_pressure.json", {**report, "status_rows": rows, "nvml": samples,
                                                         "calls": [vars(r) for r in results]})
    _plot(out_dir / "bench_pressure.png", rows, samples, results, t_on, t_off, replica_ids, report)
    serve.shutdown()
    ray.shutdown()

    def fmt(v):
        return "not reached" if v is None else f"{v * 1e3:.0f} ms"

    print(f"\nPressure run on {report['card']}: {args.replicas} replicas of {args.arch} b{args.batch}, "
          f"{args.rate:g} calls/s, pressure {extra / GiB:.2f} GiB from {'injection' if virtual else 'another process'}")
    print(benchlib.markdown_table(
        ["metric", "value"],
        [["reaction: over watermark -> all dynamic", fmt(report["reaction_to_dynamic_s"])],
         ["reaction: pressure gone -> all static (dwell " + f"{args.min_dwell_s:g} s)", fmt(report["reaction_to_static_s"])],
         ["requests sent", summary["sent"]], ["failed requests", failed],
         ["out-of-memory errors", report["oom_errors"]], ["outcomes", summary["outcomes"]],
         ["latency p50 / p99", f"{summary['p50_ms']:.1f} / {summary['p99_ms']:.1f} ms"]]))
    return 0


def _plot(path: Path, rows, samples, results, t_on, t_off, replica_ids, report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    if samples:
        ax.plot([s["t"] for s in samples], [s["used"] / GiB for s in samples], label="card used (NVML)")
        total = samples[0]["total"] / GiB
    else:
        ts = sorted({r["t"] for r in rows})
        used = {r["t"]: r["used"] for r in rows}
        ax.plot(ts, [used[t] / GiB for t in ts], label="logical GPU used (accounted)")
        total = rows[0]["total"] / GiB if rows else 1
    for share, style in ((0.90, "--"), (0.75, ":")):
        ax.axhline(share * total, color="grey", linestyle=style, linewidth=0.8)
    ax.set_ylabel("GiB")
    ax.legend(loc="lower right")
    ax = axes[1]
    for i, rid in enumerate(sorted(replica_ids)):
        pts = [(r["t"], 1 if r["mode"] == "dynamic" else 0) for r in rows if r["replica"] == rid]
        if pts:
            ax.step([p[0] for p in pts], [p[1] + i * 0.05 for p in pts], where="post", label=rid)
    ax.set_yticks([0, 1], ["static", "dynamic"])
    ax.legend(loc="center right", fontsize=7)
    ax = axes[2]
    ok = [r for r in results if r.outcome == "ok"]
    bad = [r for r in results if r.outcome != "ok"]
    ax.scatter([r.start_s for r in ok], [r.latency_s * 1e3 for r in ok], s=3, label="ok")
    if bad:
        ax.scatter([r.start_s for r in bad], [r.latency_s * 1e3 for r in bad], s=12, color="red", label="failed")
    ax.set_ylabel("latency ms")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper right")
    for a in axes:
        a.axvline(t_on, color="red", linewidth=0.8)
        a.axvline(t_off, color="green", linewidth=0.8)
    fig.suptitle(f"Pressure on {report['card']}: other process on at {t_on:.1f} s, off at {t_off:.1f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
