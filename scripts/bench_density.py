"""Density: how many replicas of one model one card holds, plain Ray Serve vs Ebb.

Replicas are added one at a time at a fixed request rate per replica until a call
fails with an out-of-memory error (or any failure) or the p99 latency passes 1.25x
the single-replica static p99. The card is made smaller for the run by a ballast
process holding all but ``--card-gib`` of it (so the run ends in minutes, not hours,
on a 141 GB H200); both systems get the same card.

    python scripts/bench_density.py --system plain   # GPU
    python scripts/bench_density.py --system ebb     # GPU, with the coordinator
    python scripts/bench_density.py --system all     # GPU: plain, ebb and ebb-groups side by side
    python scripts/bench_density.py --system ebb-pool   # GPU: ebb with the per-GPU pool
    python scripts/bench_density.py --system ebb-groups # one process holding a group of models
    python scripts/bench_density.py --quick          # CPU smoke (CI): logical GPU, plain and ebb
    python scripts/bench_density.py --merge a/bench_density.json b/bench_density.json c/bench_density.json
                                                     # one side-by-side table from one system per command
                                                     # (same card and settings; a GPU machine's 10-minute
                                                     # command limit cut --system all, 2026-12-02)

A run stopped by SIGTERM (``timeout``) writes the rows it measured before it tears down.
    python scripts/bench_density.py --quick --system ebb-groups   # CPU smoke (CI) of ebb-groups, no Ray

ebb-groups is not a count of replicas: one process (as a group replica) holds a group of
models (``scripts/bench_groups.py``, in-process ``EngineGroup``, not through Serve):
first as many as fit with every model's weights on the GPU, then ``--group-host-models``
with the host tier under Zipf-like traffic; its rows say which targets were met. The
hot models are the three highest Zipf ranks (named in the target's row); their p99 is
reported over all their calls and over those that found their model resident, with the
count of hot calls that paged in, so a miss says whether it came from the hot models'
own page-ins or from waiting behind other models' paging.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
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


def run_system(system: str, args, x: np.ndarray, sampler: benchlib.NvmlSampler,
               rows: list[dict] | None = None) -> list[dict]:
    """Add replicas one at a time until one step fails; ``rows`` (appended to, one per
    step) is also returned."""
    from ray import serve

    rows = [] if rows is None else rows
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


def _groups_serve_app(args, n: int):
    """One group deployment, one replica, ``n`` models of ``--arch`` (seeds 0..n-1), all weights on the GPU."""
    from deployments.app import bind
    from deployments.config import parse_app_config

    cfg = parse_app_config({
        "groups": [{"name": "g", "gpu_weights_budget_bytes": None, "host_tier": True, "mode": "dynamic",
                    "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}],
        "cuda": {"stack_limit_bytes": args.stack_limit_bytes},
        "models": [{
            "name": f"m{i}", "group": "g", "source": {"architecture": args.arch, "seed": i},
            "input": {"min_batch": args.batch, "opt_batch": args.batch, "max_batch": args.batch,
                      "image_size": args.image_size},
            "backend": "pytorch"} for i in range(n)],
        "coordinator": {"poll_interval_s": 0.5, "min_dwell_s": 2.0, "admission_deadline_s": 10.0,
                        "virtual_gpu_memory_bytes": int(args.card_gib * GiB)},
    })
    return bind(cfg, {"g": {"num_replicas": 1, "max_ongoing_requests": 64,
                            "ray_actor_options": {"num_gpus": args.gpu_share, "num_cpus": 0.1}}})


def run_groups_serve(args, x: np.ndarray, sampler) -> dict:
    """ebb-groups through Serve: one group replica holding ``--group-serve-models`` models,
    called by model id (Serve's multiplexing), at ``--group-rate`` calls/s in all."""
    from ray import serve

    n = args.group_serve_models
    t = time.perf_counter()
    try:
        serve.run(_groups_serve_app(args, n), name="density-groups", route_prefix="/density-groups")
        base = serve.get_deployment_handle("g", app_name="density-groups")
        handles = [base.options(multiplexed_model_id=f"m{i}") for i in range(n)]
        for h in handles:  # the first call of each model loads it (graphs captured)
            h.infer.remote({"input": x}).result(timeout_s=300)
        deploy_s = time.perf_counter() - t
        results = benchlib.drive(handles, {"input": x}, rate_per_s=args.group_rate, duration_s=args.measure_s,
                                 timeout_s=60)
        s = benchlib.summarize(results)
        mem = sampler.read() if sampler.available else None
        try:
            st = handles[0].status.remote().result(timeout_s=30)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            st = {"error": benchlib.classify(exc)}
    except Exception as exc:  # noqa: BLE001 - what stopped it is the result
        return {"models": n, "held": False, "why": f"failed: {benchlib.classify(exc)}"}
    finally:
        try:
            serve.delete("density-groups")
        except Exception:  # noqa: BLE001 - nothing to delete
            pass
    failed = sum(v for k, v in s["outcomes"].items() if k != "ok")
    tiers = [m.get("tier") for m in st.get("models", [])] if isinstance(st.get("models"), list) else []
    row = {"models": n, "held": failed == 0, "why": f"{failed} failed calls {s['outcomes']}" if failed else "",
           "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "outcomes": s["outcomes"], "deploy_s": deploy_s,
           "on_gpu": tiers.count("gpu") if tiers else None, "floor_bytes": (st.get("process") or {}).get("floor_bytes"),
           "card_used_gib": None if mem is None else mem["used"] / GiB}
    print(f"  ebb-groups (Serve): {n} models in one replica p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms "
          f"{s['outcomes']}" + ("" if mem is None else f" card {mem['used'] / GiB:.1f} GiB"), flush=True)
    return row


def _wait_card_back(sampler, used_at_start: int | None, timeout_s: float = 30.0) -> None:
    """Wait until the replicas of the runs before have left the card (their processes exit
    after serve.delete returns), so the group gets the whole card too."""
    if used_at_start is None or not sampler.available:
        return
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and sampler.read()["used"] > used_at_start + 128 * MiB:
        time.sleep(0.5)
    now = sampler.read()["used"]
    if now > used_at_start + 128 * MiB:
        print(f"  ebb-groups: {(now - used_at_start) / MiB:,.0f} MiB still held by earlier runs", flush=True)


def run_groups(args, sampler=None, used_at_start: int | None = None) -> dict:
    """The ebb-groups system, in a fresh process (the stack limit must be set before any capture)."""
    import bench_groups

    if sampler is not None:
        _wait_card_back(sampler, used_at_start)

    cfg = {**bench_groups.DEFAULTS, "arch": args.arch, "batch": args.batch, "image_size": args.image_size,
           "max_models": args.group_max_models, "host_models": args.group_host_models,
           "budget_models": args.group_budget_models, "zipf_s": args.group_zipf_s,
           "zipf_rate_per_s": args.group_rate, "stack_limit_bytes": args.stack_limit_bytes}
    if args.quick:
        cfg.update({"step": 2, "check_s": 1.0, "rate_per_s": 10.0, "zipf_warm_s": 1.0, "zipf_s_duration": 3.0,
                    "alone_s": 2.0, "page_in_repeats": 3})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(benchlib.ROOT), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_groups.py")), json.dumps(cfg)],
                          env=env, capture_output=True, text=True, timeout=args.group_timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith("  "):
            print(line, flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(bench_groups.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        print(f"  ebb-groups: worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return {"error": f"worker exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(lines[-1][len(bench_groups.RESULT_PREFIX):])
    out["wall_s"] = time.perf_counter() - t
    return out


def groups_rows(g: dict, held: dict) -> tuple[list[list], list[list]]:
    """The ebb-groups rows of the density table, and its target rows (met / not met)."""
    if "error" in g:
        return [["ebb-groups", 0, g["error"]]], []
    mode = "in-process EngineGroup, not through Serve"
    rows = [[f"ebb-groups, weights on the GPU ({mode})", g["gpu_models_held"], g["gpu_stop"]],
            [f"ebb-groups, host tier ({g['budget_models']} on the GPU)", g["host_models"],
             f"{g['zipf_failed']} failed of {g['zipf_calls']} Zipf calls, {g['zipf_page_ins']} page-ins"]]
    if held.get("plain"):
        rows.append(["ratio ebb-groups (GPU) / plain", f"{g['gpu_models_held'] / held['plain']:.2f}x", ""])
    ratio_p99 = g["hot_p99_ms"] / g["alone_p99_ms"] if g["alone_p99_ms"] else float("inf")
    hot = g.get("hot_models") or []
    hot_which = (f" (hot: {', '.join(hot)}, Zipf ranks 1-{len(hot)}, {g['hot_share']:.0%} of calls)"
                 if "hot_share" in g else "")
    hot_detail = ""
    if "hot_resident_p99_ms" in g:  # runs before the split was recorded have only the total
        ratio_res = g["hot_resident_p99_ms"] / g["alone_p99_ms"] if g["alone_p99_ms"] else float("inf")
        hot_detail = (f"; {g['hot_calls_paged_in']} of {g['hot_calls']} hot calls paged in; hot calls that "
                      f"found their model resident {g['hot_resident_p99_ms']:.1f} ms = {ratio_res:.2f}x")
    floor = g["weights_bytes"] / (g["pinned_gbps"] * 1e9)
    ratio_in = g["page_in_s"] / floor
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    targets = [
        [">= 40 models with weights on the GPU", g["gpu_models_held"], met(g["gpu_models_held"] >= 40)],
        [">= 200 models with the host tier, 0 failed calls",
         f"{g['host_models']} models, {g['zipf_failed']} failed",
         met(g["host_models"] >= 200 and g["zipf_failed"] == 0 and not g["zipf_wrong"])],
        [f"hot-model p99 <= 1.25x one model alone{hot_which}",
         f"{g['hot_p99_ms']:.1f} / {g['alone_p99_ms']:.1f} ms = {ratio_p99:.2f}x{hot_detail}", met(ratio_p99 <= 1.25)],
        ["page-in <= 2x weights / pinned H2D bandwidth",
         f"{g['page_in_s'] * 1e3:.2f} ms vs {floor * 1e3:.2f} ms ({g['weights_bytes'] / 2**20:.0f} MiB at "
         f"{g['pinned_gbps']:.1f} GB/s) = {ratio_in:.2f}x", met(ratio_in <= 2.0)],
    ]
    return rows, targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU configuration (CI smoke, no claims)")
    p.add_argument("--system", choices=["plain", "ebb", "ebb-pool", "ebb-groups", "ebb-groups-serve", "both", "all"],
                   default="both",
                   help="both: plain and ebb; all: plain, ebb and ebb-groups")
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
    p.add_argument("--group-max-models", type=int, default=56, help="ebb-groups: most models tried on the GPU")
    p.add_argument("--group-host-models", type=int, default=200, help="ebb-groups: models with the host tier")
    p.add_argument("--group-budget-models", type=int, default=32,
                   help="ebb-groups host tier: GPU weights budget, in models (at most the GPU count held - 2)")
    p.add_argument("--group-rate", type=float, default=40.0, help="ebb-groups: calls/s in all, Zipf and alone")
    p.add_argument("--group-zipf-s", type=float, default=1.1, help="ebb-groups: Zipf exponent (rank k ~ 1/k^s)")
    p.add_argument("--group-timeout-s", type=float, default=420.0)
    p.add_argument("--group-serve", action="store_true",
                   help="ebb-groups also through Serve (one group replica of --group-serve-models models)")
    p.add_argument("--group-serve-models", type=int, default=40)
    p.add_argument("--stack-limit-bytes", type=int, default=256, help="ebb-groups: CUDA stack limit set first")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="print one side-by-side table from bench_density.json files of separate runs "
                        "(one system per command, same card and settings) and run nothing")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out_dir))
    # A run cut by its time limit (timeout sends SIGTERM) still releases its ballast and
    # writes what it measured: SIGTERM becomes SystemExit, which the finally below sees.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.quick:
        args.arch, args.batch, args.image_size = "resnet18", 2, 32
        args.max_replicas, args.measure_s, args.card_gib, args.rate_per_replica = 2, 2.0, 1.0, 2.0
        args.group_max_models, args.group_host_models, args.group_budget_models, args.group_rate = 4, 8, 2, 10.0
        args.group_serve_models = 3

    import ray

    if systems_need_ray(args):
        benchlib.start_ray()
    sampler = benchlib.NvmlSampler()
    ballast = None
    if sampler.available:
        now = sampler.read()
        keep = int(args.card_gib * GiB)
        ballast = benchlib.Ballast(max(0, now["total"] - now["used"] - keep))
        ballast.take()
    used_at_start = sampler.read()["used"] if sampler.available else None
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    systems = {"both": ["plain", "ebb"], "all": ["plain", "ebb", "ebb-groups"]}.get(args.system, [args.system])
    if args.group_serve and "ebb-groups" in systems:
        systems.insert(systems.index("ebb-groups"), "ebb-groups-serve")
    results = {}
    groups: dict | None = None
    groups_serve: dict | None = None
    serve_systems = [s for s in systems if s != "ebb-groups"]
    cut: SystemExit | None = None
    try:
        if serve_systems:
            from ray import serve

            serve.start(http_options={"host": "127.0.0.1", "port": 18998})
            for system in serve_systems:
                if system == "ebb-groups-serve":
                    groups_serve = run_groups_serve(args, x, sampler)
                else:
                    # Filled row by row: a run cut short keeps the rows it measured.
                    results[system] = []
                    run_system(system, args, x, sampler, results[system])
            # Serve's replicas are gone (deleted); the group gets the same card to itself.
            serve.shutdown()
        if "ebb-groups" in systems:
            groups = run_groups(args, sampler, used_at_start)
    except SystemExit as exc:  # SIGTERM (a time limit): report what was measured, then exit
        cut = exc
        print("\ncut short by SIGTERM: the table below holds what was measured before it", flush=True)
        # Before the teardown, which may not finish inside what is left of the time limit.
        report(Path(args.out_dir), benchlib.card_name(), args, results, groups, groups_serve, cut=True)
    finally:
        if ballast is not None:
            ballast.release()
        if serve_systems:
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    if cut is not None:
        return int(cut.code or 1)
    return report(Path(args.out_dir), benchlib.card_name(), args, results, groups, groups_serve)


def report(out_dir: Path, card: str, args, results: dict, groups: dict | None, groups_serve: dict | None,
           cut: bool = False) -> int:
    """Write bench_density.json and .png and print the side-by-side table (``cut``: the
    run was stopped before its systems ended, which the table says instead of "max tried")."""
    benchlib.write_json(out_dir, "bench_density.json", {"card": card, "args": vars(args), "cut_short": cut,
                                                        "results": results, "ebb-groups": groups,
                                                        "ebb-groups-serve": groups_serve})
    _plot(out_dir / "bench_density.png", results, args, groups)
    held = {s: max([r["replicas"] for r in rows if r.get("held")], default=0) for s, rows in results.items()}
    print(f"\nDensity on {card} with {args.card_gib:g} GiB free: {args.arch} b{args.batch}, "
          f"{args.rate_per_replica:g} calls/s per replica")
    last = "cut short (SIGTERM)" if cut else "max tried"
    table = [[s, held[s], next((r["why"] for r in rows if not r.get("held")), last)] for s, rows in results.items()]
    for system in ("ebb", "ebb-pool"):
        if "plain" in held and system in held and held["plain"]:
            table.append([f"ratio {system} / plain", f"{held[system] / held['plain']:.2f}x", ""])
    targets = []
    if groups_serve is not None:
        table.append([f"ebb-groups through Serve (one replica, {groups_serve['models']} models tried)",
                      groups_serve["models"] if groups_serve["held"] else 0, groups_serve["why"] or "held"])
    if groups is not None:
        rows, targets = groups_rows(groups, held)
        table.extend(rows)
    print(benchlib.markdown_table(["system", "largest count held", "what stopped it"], table))
    if targets:
        print(f"\nebb-groups targets (issue 13; {groups.get('mode')}):")
        print(benchlib.markdown_table(["target", "measured", "met?"], targets))
    return 0




def merge(paths: list[str], out_dir: Path) -> int:
    """One table from several runs of this script on one warm machine (each system in a
    command of its own, so none is cut by a per-command time limit): the systems'
    results side by side, with the card and settings each run recorded. Refuses files
    from different cards or card sizes (their figures are not comparable)."""
    results: dict = {}
    groups = groups_serve = None
    cards, sizes, args, cut = set(), set(), None, False
    for path in paths:
        data = json.loads(Path(path).read_text())
        cards.add(data.get("card"))
        sizes.add((data["args"]["card_gib"], data["args"]["arch"], data["args"]["batch"]))
        args = args or argparse.Namespace(**data["args"])
        for system, rows in (data.get("results") or {}).items():
            if system in results:
                raise SystemExit(f"{path}: system {system!r} is in two of the files being merged")
            results[system] = rows
        cut = cut or bool(data.get("cut_short"))
        groups = data.get("ebb-groups") or groups
        groups_serve = data.get("ebb-groups-serve") or groups_serve
    if len(cards) > 1 or len(sizes) > 1:
        raise SystemExit(f"cannot merge runs on different cards or settings: cards {sorted(map(str, cards))}, "
                         f"(card GiB, arch, batch) {sorted(sizes)}")
    args.system = "+".join([*results, *(["ebb-groups"] if groups else [])])
    return report(out_dir, cards.pop(), args, results, groups, groups_serve, cut=cut)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def systems_need_ray(args) -> bool:
    return args.system != "ebb-groups" or args.group_serve


def _plot(path: Path, results: dict, args, groups: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system, rows in results.items():
        pts = [r for r in rows if "p99_ms" in r]
        ax.plot([r["replicas"] for r in pts], [r["p99_ms"] for r in pts], marker="o", label=f"{system} p99")
    if groups and groups.get("checkpoints"):
        pts = groups["checkpoints"]
        ax.plot([r["models"] for r in pts], [r["p99_ms"] for r in pts], marker="s",
                label="ebb-groups p99 (models, one process)")
    ax.set_xlabel("replicas (models, for ebb-groups) on the card")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"Density: {args.arch} b{args.batch}, {args.card_gib:g} GiB card")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
