"""Benchmark the shared admission budget: cost of reserve + release per call,
uncontended and with N processes contending, against the 50 µs target.

Two contention kinds: ``lock`` (capacity for everyone: processes only contend for the
file lock) and ``budget`` (capacity for two calls at a time, each held ``--hold-us``:
callers queue for bytes). Prints a table last and writes ``admission.png`` to
``--out-dir``.

    .venv/bin/python scripts/bench_admission.py            # full run
    .venv/bin/python scripts/bench_admission.py --quick    # CI smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_runtime.memory.admission import SharedBudget  # noqa: E402
from engine_runtime.units import MiB

TARGET_US = 50.0
CALL_BYTES = 64 * MiB


@dataclass
class Row:
    scenario: str
    processes: int
    calls: int
    mean_us: float
    p50_us: float
    p99_us: float
    calls_per_s: float


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def uncontended(key: str, iterations: int, directory: str) -> Row:
    budget = SharedBudget(key, capacity_bytes=1 << 40, directory=directory)
    reserve = budget.reserve
    for _ in range(min(1000, iterations)):  # warm caches and the process's holder slot
        with reserve(CALL_BYTES, 1.0):
            pass
    t0 = time.perf_counter()
    for _ in range(iterations):
        with reserve(CALL_BYTES, 1.0):
            pass
    bulk_s = time.perf_counter() - t0
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        t = clock()
        with reserve(CALL_BYTES, 1.0):
            pass
        samples.append((clock() - t) / 1e3)
    samples.sort()
    return Row("uncontended", 1, iterations, bulk_s / iterations * 1e6, _percentile(samples, 0.5),
               _percentile(samples, 0.99), iterations / bulk_s)


def _worker(key: str, directory: str, duration_s: float, hold_us: float, start, results) -> None:
    budget = SharedBudget(key, directory=directory)
    reserve = budget.reserve
    clock = time.perf_counter_ns
    hold_ns = int(hold_us * 1e3)
    samples = []
    start.wait()
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        t0 = clock()
        with reserve(CALL_BYTES, 10.0):
            t1 = clock()
            while clock() - t1 < hold_ns:  # stands in for the call; a sleep would yield the CPU
                pass
            t2 = clock()
        # Admission cost: getting in plus getting out, not the time held inside.
        samples.append(((t1 - t0) + (clock() - t2)) / 1e3)
    results.put(samples)


def contended(key: str, directory: str, kind: str, processes: int, duration_s: float, hold_us: float) -> Row:
    capacity = (1 << 40) if kind == "lock" else 2 * CALL_BYTES
    budget = SharedBudget(key, capacity_bytes=capacity, directory=directory)
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    hold = hold_us if kind == "budget" else 0.0
    procs = [ctx.Process(target=_worker, args=(key, directory, duration_s, hold, start, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    start.set()
    samples: list[float] = []
    for _ in procs:
        samples.extend(results.get(timeout=duration_s + 60))
    for p in procs:
        p.join(30)
    leftover = budget.snapshot().used_bytes
    if leftover:
        raise SystemExit(f"budget leak: {leftover} bytes still held after the run")
    samples.sort()
    return Row(f"{kind}", processes, len(samples), statistics.fmean(samples), _percentile(samples, 0.5),
               _percentile(samples, 0.99), len(samples) / duration_s)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next(r for r in rows if r.scenario == "uncontended")
    for kind, colour in (("lock", "tab:blue"), ("budget", "tab:orange")):
        mine = [r for r in rows if r.scenario == kind]
        if not mine:
            continue
        n = [r.processes for r in mine]
        ax.plot(n, [r.p50_us for r in mine], "o-", color=colour, label=f"{kind} contention p50")
        ax.plot(n, [r.p99_us for r in mine], "o--", color=colour, label=f"{kind} contention p99")
    ax.axhline(base.p50_us, color="tab:green", label=f"uncontended p50 ({base.p50_us:.1f} µs)")
    ax.axhline(TARGET_US, color="tab:red", linestyle=":", label=f"target {TARGET_US:.0f} µs (uncontended)")
    ax.set_xlabel("processes contending")
    ax.set_ylabel("admission cost per call (µs)")
    ax.set_yscale("log")
    ax.set_title(f"SharedBudget reserve + release ({os.cpu_count()} CPUs)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="./out", help="where admission.png goes (default ./out)")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: few calls, 1-2 processes")
    parser.add_argument("--processes", type=int, nargs="+", help="process counts to contend with")
    parser.add_argument("--duration-s", type=float, help="seconds per contended point")
    parser.add_argument("--hold-us", type=float, default=100.0, help="time a call holds its bytes (budget kind)")
    parser.add_argument("--directory", default="/dev/shm", help="where the budget file lives")
    args = parser.parse_args(argv)

    iterations = 2_000 if args.quick else 100_000
    counts = args.processes or ([1, 2] if args.quick else [1, 2, 4, 8])
    duration_s = args.duration_s or (0.3 if args.quick else 2.0)
    os.makedirs(args.out_dir, exist_ok=True)

    rows: list[Row] = []
    keys = []
    try:
        key = f"bench-{uuid.uuid4().hex[:12]}"
        keys.append(key)
        rows.append(uncontended(key, iterations, args.directory))
        for kind in ("lock", "budget"):
            for n in counts:
                key = f"bench-{uuid.uuid4().hex[:12]}"
                keys.append(key)
                rows.append(contended(key, args.directory, kind, n, duration_s, args.hold_us))
                print(f"  {kind:>6} x{n}: p50 {rows[-1].p50_us:.1f} µs", file=sys.stderr, flush=True)
    finally:
        for k in keys:
            SharedBudget(k, directory=args.directory).unlink()

    path = os.path.join(args.out_dir, "admission.png")
    plot(rows, path)
    base = rows[0]
    verdict = "meets" if base.mean_us <= TARGET_US else "MISSES"
    print(f"\nplot: {path}")
    print(f"uncontended reserve+release: {base.mean_us:.1f} µs per call, {verdict} the {TARGET_US:.0f} µs target")
    print(f"(budget kind: capacity for 2 calls, each held {args.hold_us:.0f} µs; cost excludes the hold)\n")
    header = f"{'scenario':<12} {'procs':>5} {'calls':>9} {'mean µs':>9} {'p50 µs':>9} {'p99 µs':>9} {'calls/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.scenario:<12} {r.processes:>5} {r.calls:>9} {r.mean_us:>9.1f} {r.p50_us:>9.1f} "
              f"{r.p99_us:>9.1f} {r.calls_per_s:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
