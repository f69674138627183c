"""Density: how many replicas of one model one card holds, plain Ray Serve vs Ebb.

Replicas are added one at a time at a fixed request rate per replica until a call
fails with an out-of-memory error (or any failure) or the p99 latency passes 1.25x
the single-replica static p99. The card is made smaller for the run by a ballast
process holding all but ``--card-gib`` of it (so the run ends in minutes, not hours,
on a 141 GB H200); both systems get the same card.

    python scripts/bench_density.py --system plain   # GPU
    python scripts/bench_density.py --system ebb     # GPU, with the coordinator
    python scripts/bench_density.py --system all     # GPU: plain, ebb, and ebb with the per-GPU pool
    python scripts/bench_density.py --quick          # CPU smoke (CI): logical GPU, both systems
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import GiB, MiB  # noqa: E402


def _ebb_app(args, n: int, pool: bool = False):
    from deployments.app import bind
    from deployments.config import parse_app_config

    # ebb-pool: context memory leased per call from the GPU's shared pool, capped at
    # --pool-mib (the calls that may run at once), instead of mapped per replica.
    context_pool = {"enabled": True, "chunk_bytes": args.pool_chunk_mib * MiB,
                    "max_bytes": args.pool_mib * MiB} if pool else {}
    cfg = parse_app_config({
        "context_pool": context_pool,
        "models": [{
            "name": "m", "source": {"architecture": args.arch, "seed": 0},
            "input": {"min_batch": 1, "opt_batch": args.batch, "max_batch": args.batch,
                      "image_size": args.image_size},
            "backend": "pytorch", "mode": "dynamic", "pin": "auto", "lazy": False,
            "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        }],
        "coordinator": {"poll_interval_s": 0.5, "min_dwell_s": 2.0, "admission_deadline_s": 10.0,
                        "virtual_gpu_memory_bytes": int(args.card_gib * GiB)},
    })
    return bind(cfg, {"m": {"num_replicas": n, "max_ongoing_requests": 64,
                            "ray_actor_options": {"num_gpus": args.gpu_share, "num_cpus": 0.1}}})


def _plain_app(args, n: int):
    plain = benchlib.plain_deployment()
    return plain.options(name="m", num_replicas=n, max_ongoing_requests=64,
                         ray_actor_options={"num_gpus": args.gpu_share, "num_cpus": 0.1}).bind(
        args.arch, args.image_size)


def run_system(system: str, args, x: np.ndarray, sampler: benchlib.NvmlSampler) -> list[dict]:
    from ray import serve

    rows = []
    baseline_p99 = None
    for n in range(1, args.max_replicas + 1):
        app = _plain_app(args, n) if system == "plain" else _ebb_app(args, n, pool=system == "ebb-pool")
        t = time.perf_counter()
        try:
            serve.run(app, name=f"density-{system}", route_prefix=f"/density-{system}")
        except Exception as exc:  # noqa: BLE001 - a replica that cannot start (OOM at load) ends the run
            rows.append({"replicas": n, "held": False, "why": f"deploy failed: {benchlib.classify(exc)}"})
            break
        deploy_s = time.perf_counter() - t
        handle = serve.get_deployment_handle("m", app_name=f"density-{system}")
        # Warm every replica (each serves a few calls), then measure at the fixed rate.
        benchlib.drive([handle], {"input": x}, rate_per_s=4 * n, duration_s=2.0, timeout_s=60)
        results = benchlib.drive([handle], {"input": x}, rate_per_s=args.rate_per_replica * n,
                                 duration_s=args.measure_s, timeout_s=60)
        s = benchlib.summarize(results)
        failed = sum(v for k, v in s["outcomes"].items() if k != "ok")
        if baseline_p99 is None:
            baseline_p99 = s["p99_ms"]
        mem = sampler.read() if sampler.available else None
        # What the replicas really used (a pool that could not start falls back silently).
        try:
            st = handle.status.remote().result(timeout_s=30) if system != "plain" else {}
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            st = {"mechanism": f"status failed: {benchlib.classify(exc)}"}
        held = failed == 0 and s["p99_ms"] <= 1.25 * baseline_p99
        why = "" if held else (f"{failed} failed calls {s['outcomes']}" if failed else
                               f"p99 {s['p99_ms']:.1f} ms > 1.25 x {baseline_p99:.1f} ms")
        rows.append({"replicas": n, "held": held, "why": why, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                     "outcomes": s["outcomes"], "deploy_s": deploy_s,
                     "mechanism": st.get("mechanism"), "pool": st.get("pool"),
                     "card_used_gib": None if mem is None else mem["used"] / GiB})
        print(f"  {system}: {n} replicas p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms {s['outcomes']}"
              + ("" if mem is None else f" card {mem['used'] / GiB:.1f} GiB")
              + (f" [{st.get('mechanism')}]" if st else "") + ("" if held else f"  STOP: {why}"),
              flush=True)
        if not held:
            break
    serve.delete(f"density-{system}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU configuration (CI smoke, no claims)")
    p.add_argument("--system", choices=["plain", "ebb", "ebb-pool", "both", "all"], default="both",
                   help="both: plain and ebb; all: plain, ebb and ebb-pool (GPU only)")
    p.add_argument("--pool-mib", type=int, default=1024, help="ebb-pool: the most the pool may hold")
    p.add_argument("--pool-chunk-mib", type=int, default=128, help="ebb-pool: chunk size")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--card-gib", type=float, default=12.0, help="card size left free for the run")
    p.add_argument("--max-replicas", type=int, default=16)
    p.add_argument("--gpu-share", type=float, default=0.05, help="num_gpus per replica (logical)")
    p.add_argument("--rate-per-replica", type=float, default=2.0)
    p.add_argument("--measure-s", type=float, default=6.0)
    p.add_argument("--out-dir", default="out")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.image_size = "resnet18", 2, 32
        args.max_replicas, args.measure_s, args.card_gib, args.rate_per_replica = 2, 2.0, 1.0, 2.0

    import ray

    benchlib.start_ray()
    sampler = benchlib.NvmlSampler()
    ballast = None
    if sampler.available:
        now = sampler.read()
        keep = int(args.card_gib * GiB)
        ballast = benchlib.Ballast(max(0, now["total"] - now["used"] - keep))
        ballast.take()
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    systems = {"both": ["plain", "ebb"], "all": ["plain", "ebb", "ebb-pool"]}.get(args.system, [args.system])
    results = {}
    try:
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": 18998})
        for system in systems:
            results[system] = run_system(system, args, x, sampler)
    finally:
        if ballast is not None:
            ballast.release()
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    out_dir = Path(args.out_dir)
    benchlib.write_json(out_dir, "bench_density.json", {"card": benchlib.card_name(), "args": vars(args),
                                                        "results": results})
    _plot(out_dir / "bench_density.png", results, args)
    held = {s: max([r["replicas"] for r in rows if r.get("held")], default=0) for s, rows in results.items()}
    print(f"\nDensity on {benchlib.card_name()} with {args.card_gib:g} GiB free: {args.arch} b{args.batch}, "
          f"{args.rate_per_replica:g} calls/s per replica")
    table = [[s, held[s], next((r["why"] for r in rows if not r.get("held")), "max tried")] for s, rows in results.items()]
    for system in ("ebb", "ebb-pool"):
        if "plain" in held and system in held and held["plain"]:
            table.append([f"ratio {system} / plain", f"{held[system] / held['plain']:.2f}x", ""])
    print(benchlib.markdown_table(["system", "largest count held", "what stopped it"], table))
    return 0


def _plot(path: Path, results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system, rows in results.items():
        pts = [r for r in rows if "p99_ms" in r]
        ax.plot([r["replicas"] for r in pts], [r["p99_ms"] for r in pts], marker="o", label=f"{system} p99")
    ax.set_xlabel("replicas on the card")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"Density: {args.arch} b{args.batch}, {args.card_gib:g} GiB card")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
