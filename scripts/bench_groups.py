"""The ebb-groups system of bench_density: one process holding a group of models.

Runs in a process of its own (bench_density starts it; ``python scripts/bench_groups.py
'<json>'`` by hand), as a group replica would: CUDA's stack limit is set first, the
floor measured, then:

A. **weights on the GPU**: models are added one at a time (no weights budget: every
   model's weights stay on the GPU) until one cannot be loaded or ``max_models`` is
   reached, with a short run of traffic every ``step`` models; the count *held* is the
   largest whose traffic had 0 failed calls and answers equal to each model's first.
B. **host tier**: the budget is set to ``budget_models`` models' weights and models are
   added up to ``host_models``; the least recently used go to pinned host memory.
   Traffic is Zipf-like over all of them (rank k drawn with weight 1/k^s: a few hot,
   most cold), at the same total rate as a run of one model alone measured just before.
   A warm-up run of the same traffic (other draws) comes first, so the measured run
   starts with the group's steady choice of residents, not with whichever models the
   loading left on the GPU. The **hot models** are the ``hot_models`` highest Zipf
   ranks; their p99 is compared with the one model's. Each call records whether its
   model was paged in during it (its own page-in, or one it waited for), so the report
   splits the hot p99 into calls that found their model resident (the wait for other
   models' paging and for the GPU) and the hot calls that paged in.
C. **page-in**: one model's weights paged out and back in, beside a pinned
   host-to-device copy of the same bytes measured here.

The group runs in this process through ``EngineGroup`` (the engine floor), not
through Serve; the table says so. Models are one architecture with distinct weights
(a copy of one built model whose classifier bias is shifted by a per-model amount:
building 200 ResNet-50s from scratch costs minutes of CPU). Asserts nothing.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT_PREFIX = "EBB_GROUPS_RESULT "
MiB = 2**20


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Traffic:
    """Open-loop calls at a fixed total rate from a thread pool; latency from the scheduled time."""

    def __init__(self, group, x, refs: dict, threads: int = 8) -> None:
        self.group, self.x, self.refs = group, x, refs
        self.pool = ThreadPoolExecutor(threads)

    def run(self, pick, rate_per_s: float, duration_s: float) -> dict:
        n = max(1, int(rate_per_s * duration_s))
        lat: dict[str, list[float]] = {}
        failures: list[str] = []
        wrong: list[str] = []
        lock = threading.Lock()
        t0 = time.perf_counter() + 0.05

        paged: dict[str, list[bool]] = {}

        def one(i: int, name: str) -> None:
            at = t0 + i / rate_per_s
            engine = self.group.engine(name)
            page_ins = engine.tier_counts()["page_ins"]
            try:
                out = self.group.infer(name, {"input": self.x})["output"]
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
                return
            dt = time.perf_counter() - at
            # The model came onto the GPU during this call (or just before it, by another call).
            was_paged = engine.tier_counts()["page_ins"] != page_ins
            ok = name not in self.refs or np.array_equal(_np(out), self.refs[name])
            with lock:
                lat.setdefault(name, []).append(dt)
                paged.setdefault(name, []).append(was_paged)
                if not ok:
                    wrong.append(name)

        futures = []
        for i in range(n):
            wait = t0 + i / rate_per_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(self.pool.submit(one, i, pick(i)))
        for f in futures:
            f.result()
        every = [v for vs in lat.values() for v in vs]
        return {"calls": n, "failed": len(failures), "failures": failures[:5], "wrong": sorted(set(wrong)),
                "p50_ms": _percentile(every, 50) * 1e3, "p99_ms": _percentile(every, 99) * 1e3, "by_model": lat,
                "paged_by_model": paged}

    def close(self) -> None:
        self.pool.shutdown()


def hot_view(run: dict, names: list[str], share, hot_models: int) -> dict:
    """The hot models of a Zipf run (the ``hot_models`` highest ranks) and their p99: over all
    their calls, over those that found their model resident, and every model's resident calls."""
    hot_names = names[:hot_models]
    lat, paged = run["by_model"], run["paged_by_model"]

    def calls(models, resident_only: bool) -> list[float]:
        return [v for n in models for v, p in zip(lat.get(n, []), paged.get(n, [])) if not (resident_only and p)]

    hot_all = calls(hot_names, False)
    return {"hot_models": hot_names, "hot_share": float(sum(share[:hot_models])), "hot_calls": len(hot_all),
            "hot_calls_paged_in": sum(p for n in hot_names for p in paged.get(n, [])),
            "hot_p99_ms": _percentile(hot_all, 99) * 1e3,
            "hot_resident_p99_ms": _percentile(calls(hot_names, True), 99) * 1e3,
            "resident_p99_ms": _percentile(calls(names, True), 99) * 1e3,
            "calls_paged_in": sum(p for ps in paged.values() for p in ps)}


def _np(value):
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def main(cfg: dict) -> dict:
    import torch

    from engine_runtime import EngineGroup, GroupBudget, set_cuda_stack_limit
    from engine_runtime.cuda_process import ProcessMemory, get_cuda_stack_limit, measure_process_floor

    gpu = torch.cuda.is_available()
    reader = ProcessMemory() if gpu else None
    limit = None
    if gpu:
        set_cuda_stack_limit(cfg["stack_limit_bytes"])
        limit = get_cuda_stack_limit()
    floor = measure_process_floor() if gpu else None

    from engine_runtime.backends.pytorch import PyTorchEngine
    from engine_runtime.spec import ShapeProfile

    from engine_runtime.architectures import build

    base = build(cfg["arch"], seed=0, image_size=cfg["image_size"])
    sample = base.sample_shape
    b = cfg["batch"]
    profile = ShapeProfile((b, *sample), (b, *sample), (b, *sample))
    device = "cuda" if gpu else "cpu"

    def make(i: int):
        def factory():
            m = copy.deepcopy(base.module)
            with torch.no_grad():
                m.fc.bias.add_(0.01 * i)  # distinct answers per model, no rebuild
            return m

        return lambda: PyTorchEngine(f"m{i}", factory, input_name=base.input_name, input_dtype=base.input_dtype,
                                     profile=profile, output_name=base.output_name, output_shape=base.output_shape,
                                     device=device, mode="dynamic", admission_deadline_s=cfg["deadline_s"])

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((b, *sample), dtype=np.float32))
    group = EngineGroup(GroupBudget(gpu_weights_budget_bytes=None, host_tier=True), name="bench",
                        deadline_s=cfg["deadline_s"])
    refs: dict[str, np.ndarray] = {}
    traffic = Traffic(group, x, refs)
    out: dict = {"mode": "in-process EngineGroup (engine floor), not through Serve", "device": device,
                 "stack_limit_bytes": limit, "floor_bytes": floor, "checkpoints": []}

    def used() -> int | None:
        if reader is None:
            return None
        torch.cuda.synchronize()
        return reader.read()

    def room(i: int) -> str | None:
        """On a GPU: whether loading one more model fits (weights, plus the eager warm-up and
        the capture's transient memory: about one call's context and a quarter, and a margin),
        so the card is never driven into an out-of-memory error in the middle of a capture."""
        if not gpu or not group.names():
            return None
        ctx = group.context_bytes_per_call()
        need = wb_est + ctx * 5 // 4 + cfg["load_margin_mib"] * MiB
        free = torch.cuda.mem_get_info()[0]
        if free < need:
            return (f"card full: {free / MiB:,.0f} MiB free < {need / MiB:,.0f} MiB to load model "
                    f"{len(group.names()) + 1} (weights + capture)")
        return None

    def add(i: int) -> str | None:
        name = f"m{i}"
        why = room(i)
        if why:
            return why
        try:
            group.add(name, make(i), lazy=False)
            refs[name] = _np(group.infer(name, {"input": x})["output"])
            return None
        except Exception as exc:  # noqa: BLE001 - the card is full: what stopped phase A
            if name in group:
                group.remove(name)
            refs.pop(name, None)
            return f"load of model {len(group.names()) + 1} failed: {type(exc).__name__}: {str(exc)[:160]}"

    wb_est = make(0)().weights_device_bytes()

    # -- A: weights on the GPU ---------------------------------------------------------
    t_a = time.perf_counter()
    stop = None
    held = 0
    for i in range(cfg["max_models"]):
        if time.perf_counter() - t_a > cfg["gpu_load_budget_s"]:
            stop = f"time budget: {cfg['gpu_load_budget_s']:.0f} s of loading spent"
            break
        stop = add(i)
        if stop:
            break
        n = len(group.names())
        if n % cfg["step"] == 0 or n == cfg["max_models"]:
            names = group.names()
            r = traffic.run(lambda k, names=names: names[k % len(names)], cfg["rate_per_s"], cfg["check_s"])
            ok = r["failed"] == 0 and not r["wrong"]
            out["checkpoints"].append({"models": n, "held": ok, "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                                       "failed": r["failed"], "failures": r["failures"], "used_bytes": used()})
            print(f"  ebb-groups: {n} models on the GPU p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
                  f"failed {r['failed']}" + (f" used {used() / 2**30:.2f} GiB" if gpu else ""), flush=True)
            if ok:
                held = n
            else:
                stop = f"{r['failed']} failed calls at {n} models: {r['failures'][:2]}"
                break
    # The largest count whose traffic had no failure (the last checkpoint may lag the count loaded).
    names = group.names()
    while len(names) > held and names:
        r = traffic.run(lambda k, names=names: names[k % len(names)], cfg["rate_per_s"], cfg["check_s"])
        if r["failed"] == 0 and not r["wrong"]:
            held = len(names)
            out["checkpoints"].append({"models": held, "held": True, "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                                       "failed": 0, "failures": [], "used_bytes": used()})
            break
        group.remove(names[-1])
        refs.pop(names[-1], None)
        names = group.names()
    out["gpu_models_held"] = held
    out["gpu_stop"] = stop or "max tried"
    out["gpu_phase_s"] = time.perf_counter() - t_a
    wb = group.engine(group.names()[0]).weights_device_bytes()
    out["weights_bytes"] = wb

    # -- B: host tier under Zipf-like traffic ----------------------------------------------
    t_b = time.perf_counter()
    budget_models = min(cfg["budget_models"], max(1, held - 2)) if gpu else cfg["budget_models"]
    group.set_budget(GroupBudget(gpu_weights_budget_bytes=budget_models * wb, host_tier=True))
    load_fail = None
    for i in range(len(group.names()), cfg["host_models"]):
        if time.perf_counter() - t_b > cfg["host_load_budget_s"]:
            load_fail = f"time budget: {cfg['host_load_budget_s']:.0f} s of loading spent"
            break
        why = add(i)
        if why:
            load_fail = why
            break
    names = group.names()
    print(f"  ebb-groups: {len(names)} models loaded ({budget_models} on the GPU) in "
          f"{time.perf_counter() - t_b:.0f} s" + (f"; stopped: {load_fail}" if load_fail else ""), flush=True)
    out["host_models"] = len(names)
    out["budget_models"] = budget_models
    out["host_load_stop"] = load_fail
    out["host_load_s"] = time.perf_counter() - t_b
    # One model alone, at the rate the Zipf run will use (the comparison's baseline).
    hot = names[0]
    group.ensure_resident(hot)
    traffic.run(lambda k: hot, cfg["zipf_rate_per_s"], 1.0)  # warm
    alone = traffic.run(lambda k: hot, cfg["zipf_rate_per_s"], cfg["alone_s"])
    rng = np.random.default_rng(1)
    weights = 1.0 / np.arange(1, len(names) + 1) ** cfg["zipf_s"]
    share = weights / weights.sum()
    warm_draws = rng.choice(len(names), size=int(cfg["zipf_rate_per_s"] * cfg["zipf_warm_s"]) + 1, p=share)
    warm = traffic.run(lambda k: names[int(warm_draws[k % len(warm_draws)])], cfg["zipf_rate_per_s"],
                       cfg["zipf_warm_s"])
    draws = rng.choice(len(names), size=int(cfg["zipf_rate_per_s"] * cfg["zipf_s_duration"]) + 1, p=share)
    before = {s.name: s.page_ins for s in group.status()}
    zipf = traffic.run(lambda k: names[int(draws[k % len(draws)])], cfg["zipf_rate_per_s"], cfg["zipf_s_duration"])
    after = {s.name: s for s in group.status()}
    hot_stats = hot_view(zipf, names, share, cfg["hot_models"])
    out.update({
        "alone_p50_ms": alone["p50_ms"], "alone_p99_ms": alone["p99_ms"], "alone_failed": alone["failed"],
        "zipf_calls": zipf["calls"], "zipf_failed": zipf["failed"], "zipf_failures": zipf["failures"],
        "zipf_wrong": zipf["wrong"], "zipf_p50_ms": zipf["p50_ms"], "zipf_p99_ms": zipf["p99_ms"],
        "zipf_warm_calls": warm["calls"], "zipf_warm_failed": warm["failed"], **hot_stats,
        "models_called": len(zipf["by_model"]),
        "zipf_page_ins": sum(after[n].page_ins - before.get(n, 0) for n in names),
        "resident_models": sum(s.tier.value == "gpu" for s in after.values()),
        "host_tier_models": sum(s.tier.value == "host" for s in after.values()),
        "used_bytes_after_zipf": used(),
    })
    print(f"  ebb-groups: {len(names)} models, {budget_models} on the GPU: zipf {zipf['calls']} calls "
          f"(after {warm['calls']} warm-up), {out['zipf_page_ins']} page-ins, failed {zipf['failed']}", flush=True)
    print(f"  ebb-groups: hot models (Zipf ranks 1-{len(hot_stats['hot_models'])}: "
          f"{', '.join(hot_stats['hot_models'])}; {hot_stats['hot_share']:.0%} of the draws): {hot_stats['hot_calls']} calls, "
          f"{hot_stats['hot_calls_paged_in']} paged in; hot p99 {hot_stats['hot_p99_ms']:.1f} ms, of those that found their "
          f"model resident {hot_stats['hot_resident_p99_ms']:.1f} ms; every model's resident calls p99 "
          f"{hot_stats['resident_p99_ms']:.1f} ms; one model alone p99 {alone['p99_ms']:.1f} ms", flush=True)

    # -- C: one page-in beside a pinned copy of the same bytes ------------------------------
    cold = names[-1]
    group.ensure_resident(cold)  # from here on, each page-in finds the room its page-out left
    page_ins = []
    for _ in range(cfg["page_in_repeats"]):
        group.page_out(cold)
        page_ins.append(group.ensure_resident(cold))
    host = torch.empty(wb, dtype=torch.uint8, pin_memory=gpu)
    dev = torch.empty(wb, dtype=torch.uint8, device=device)
    copies = []
    for _ in range(cfg["page_in_repeats"]):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=gpu)
        if gpu:
            torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    del host, dev
    out["page_in_s"] = float(np.median(page_ins))
    out["pinned_copy_s"] = float(np.median(copies))
    out["pinned_gbps"] = wb / out["pinned_copy_s"] / 1e9
    out["stack_limit_end_bytes"] = get_cuda_stack_limit() if gpu else None
    traffic.close()
    group.close()
    return out


DEFAULTS = {"arch": "resnet50", "batch": 32, "image_size": 224, "max_models": 56, "step": 8, "check_s": 3.0,
            "rate_per_s": 20.0, "budget_models": 32, "host_models": 200, "zipf_s": 1.1, "zipf_rate_per_s": 40.0,
            "zipf_warm_s": 5.0, "zipf_s_duration": 15.0, "alone_s": 6.0, "hot_models": 3, "page_in_repeats": 10,
            "deadline_s": 10.0,
            "stack_limit_bytes": 256, "load_margin_mib": 320,
            "gpu_load_budget_s": 90.0, "host_load_budget_s": 150.0}


if __name__ == "__main__":
    conf = {**DEFAULTS, **(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})}
    print(RESULT_PREFIX + json.dumps(main(conf)), flush=True)
