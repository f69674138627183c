"""Measure the context pool: what a 1 GiB lease + map + unmap + return costs by chunk size.

The chunk size is a trade-off: a lease maps one piece per chunk (more chunks, more
``cuMemMap`` calls) but wastes under one chunk of memory. This prints, per chunk size,
the lease-table cost alone and the full per-call cost through a ``VmmArena``, next to
two baselines (physical memory created per call; one premade allocation mapped
whole), then writes a PNG to ``--out-dir``. The table is printed last.

    python scripts/bench_pool.py --out-dir bench_out            # GPU machine
    python scripts/bench_pool.py --quick --out-dir bench_out    # CPU: lease table only
    python scripts/bench_pool.py --cpu-path --out-dir bench_out # CPU: host side of a call, fake driver

``--cpu-path`` times the host-side work a dynamic call on the pool does per call, layer
by layer, as the call does it (``BaseEngine.dynamic_context`` -> ``VmmArena`` with
kept mappings -> ``PoolPhysical`` -> the lease table), with CUDA faked
(``tests/unit/cuda_fake.py``: a mapping is bookkeeping, a chunk a memfd). It says what
the Python, the lock and the table cost on this host's CPU, nothing about a GPU: on a
card ``cuMemMap``/``cuMemUnmap`` of changed chunks and the driver's own time come on top.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import multiprocessing as mp
import pstats
import threading
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_runtime.memory.pool._lease_table import LeaseTable  # noqa: E402
from engine_runtime.units import MiB, GiB



def summarize(times_s: list[float]) -> tuple[float, float]:
    ordered = sorted(times_s)
    return statistics.median(ordered) * 1e6, ordered[int(0.9 * (len(ordered) - 1))] * 1e6


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def plot(path: Path, title: str, xs: list[int], series: dict[str, list[float]], baselines: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    for label, y in baselines.items():
        ax.axhline(y, linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("chunk size (MiB)")
    ax.set_ylabel("p50 per call (µs)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# --- CPU: the lease table alone ------------------------------------------------------------


def _contender(path: str, nchunks: int, started, stop) -> None:
    table = LeaseTable.open(path)
    while not stop.is_set():
        table.give_back(table.lease(nchunks, deadline_s=10.0))
        started.set()
    table.close()


def quick(args: argparse.Namespace) -> None:
    chunk_sizes = args.chunks_mib
    lease_bytes = int(args.lease_gib * GiB)
    rows, alone, contended = [], [], []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as d:
        for chunk_mib in chunk_sizes:
            nchunks = max(1, lease_bytes // (chunk_mib * MiB))
            path = Path(d) / f"bench-{chunk_mib}.table"
            table = LeaseTable.create(path, max_chunks=2 * nchunks, chunk_bytes=chunk_mib * MiB, label="bench")
            table.commit_created(table.resize(2 * nchunks).to_create)
            times = []
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                table.give_back(table.lease(nchunks, deadline_s=1.0))
                times.append(time.perf_counter() - t0)
            p50, p90 = summarize(times)
            # One other process leasing the other half back to back: the lock is now shared.
            ctx = mp.get_context("spawn")
            started, stop = ctx.Event(), ctx.Event()
            other = ctx.Process(target=_contender, args=(str(path), nchunks, started, stop))
            other.start()
            started.wait(60)
            times = []
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                table.give_back(table.lease(nchunks, deadline_s=5.0))
                times.append(time.perf_counter() - t0)
            stop.set()
            other.join()
            c50, c90 = summarize(times)
            table.close()
            alone.append(p50)
            contended.append(c50)
            rows.append([str(chunk_mib), str(nchunks), f"{p50:.1f}", f"{p90:.1f}", f"{c50:.1f}", f"{c90:.1f}"])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "bench_pool_quick.png", f"lease table: lease + give back of {args.lease_gib:g} GiB (CPU)",
         chunk_sizes, {"alone": alone, "with one contender": contended}, {})
    print_table(f"Lease table only (CPU, no mapping), {args.lease_gib:g} GiB per lease, {args.iterations} runs",
                ["chunk MiB", "chunks", "alone p50 µs", "alone p90 µs", "contended p50 µs", "contended p90 µs"], rows)


# --- CPU: the host side of one dynamic call on the pool, with CUDA faked ----------------------


def _percentiles_us(times_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(times_ns)
    return ordered[len(ordered) // 2] / 1e3, ordered[int(0.99 * (len(ordered) - 1))] / 1e3


def _timed_pairs(acquire, release, iterations: int, warmup: int, between=None) -> dict[str, list[int]]:
    """Run ``release(acquire())`` ``warmup + iterations`` times; the acquire's, the
    release's and the pair's durations (ns) of the last ``iterations``. ``between()``
    runs untimed before each pair (another replica's turn)."""
    acq, rel, pair = [], [], []
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(warmup + iterations):
        if between is not None:
            between()
        t0 = clock()
        held = acquire()
        t1 = clock()
        release(held)
        t2 = clock()
        if i >= warmup:
            acq.append(t1 - t0)
            rel.append(t2 - t1)
            pair.append(t2 - t0)
    return {"acquire": acq, "release": rel, "total": pair}


def cpu_path(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests" / "unit"))
    from cuda_fake import CHUNK, FakeCuda, fake_cuda  # the unit tests' fake driver

    fake_cuda()
    from engine_runtime.engine import BaseEngine
    from engine_runtime.memory import arena as arena_module
    from engine_runtime.memory.arena import VmmArena
    from engine_runtime.memory.modes import ContextMechanism
    from engine_runtime.memory.pool import ContextPool, PoolPhysical

    arena_module._cuda = FakeCuda  # bound when the arena module was first imported

    class PoolCallEngine(BaseEngine):
        """Only what ``dynamic_context`` needs: the admission (unbounded on the pool, as
        ``deployments.engine_factory`` gives) and the stats a real call keeps."""

        def _describe_impl(self):
            raise NotImplementedError

        def _mechanism_impl(self):
            return ContextMechanism.VMM_POOL

        def _context_bytes_impl(self, shapes):
            raise NotImplementedError

        def _load_impl(self) -> None:
            pass

        def _execute_impl(self, inputs, shapes, mode):
            raise NotImplementedError

        def _close_impl(self) -> None:
            pass

    results: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ebbc", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as d:
        for nchunks in args.cpu_chunks:
            sock = Path(f"/tmp/ebb-bench-{os.getpid()}-{nchunks}.sock")  # AF_UNIX paths are short
            pool = ContextPool(0, "GPU-fake", CHUNK, 4 * nchunks, sock, table_path=Path(d) / f"pool-{nchunks}.table",
                               max_chunks=4 * nchunks)
            owner = threading.Thread(target=pool.serve_forever, daemon=True)
            owner.start()
            # As a replica's (deployments.engine_factory, no max_bytes): with its watcher
            # thread, and growing the pool for any lease larger than it.
            client = PoolPhysical(sock, 0, grow_limit_chunks=sys.maxsize)
            other = None
            try:
                table = client.table
                nbytes = nchunks * CHUNK
                arena = VmmArena(0, nbytes, source=client, deadline_s=5.0, keep_mapped=True)
                engine = PoolCallEngine("bench", admission_deadline_s=5.0)
                allocate = lambda n: arena.allocate(n, (0,), deadline_s=engine.call_deadline_s)  # noqa: E731
                mine = list(range(nchunks))

                def call_enter():
                    cm = engine.dynamic_context(nbytes, allocate)
                    cm.__enter__()
                    return cm

                layers = [
                    ("lease table: lease(prefer) / give_back",
                     lambda: table.lease(nchunks, 5.0, prefer=mine), table.give_back),
                    ("pool client: acquire(prefer) / release",
                     lambda: client.acquire(nbytes, 5.0, prefer=mine), lambda lease: lease.release()),
                    ("arena: allocate / release (kept mapping)",
                     lambda: arena.allocate(nbytes, (0,), deadline_s=5.0), lambda block: block.release()),
                    ("call: dynamic_context enter / exit",
                     call_enter, lambda cm: cm.__exit__(None, None, None)),
                ]
                per_layer = {}
                for name, acquire, release in layers:
                    per_layer[name] = _timed_pairs(acquire, release, args.iterations, args.warmup)
                # Every call finds its chunks taken meanwhile by another replica (a second
                # handle on the table, with a lock of its own): the slow path, and a remap.
                other = type(table).open(table.path)
                held: list[list[int]] = []

                def take_theirs() -> None:
                    if held:
                        other.give_back(held.pop())
                    res = arena._resident.get(0)
                    held.append(other.lease(nchunks, 5.0, prefer=list(res.tokens) if res else mine))

                per_layer["call, chunks taken meanwhile (remap)"] = _timed_pairs(
                    call_enter, lambda cm: cm.__exit__(None, None, None), args.iterations, args.warmup,
                    between=take_theirs)
                if held:
                    other.give_back(held.pop())
                if args.profile:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.iterations):
                        with engine.dynamic_context(nbytes, allocate):
                            pass
                    prof.disable()
                    print(f"\ncProfile of {args.iterations} calls, {nchunks} chunk(s), chunks kept:")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
                counts = arena.mapping_counts()
                arena.close()
            finally:
                if other is not None:
                    other.close()
                client.close()
                pool.stop()
                owner.join(30)
                pool.close()
            results[str(nchunks)] = {name: {k: list(_percentiles_us(v)) for k, v in t.items()}
                                     for name, t in per_layer.items()}
            results[str(nchunks)]["mapping_counts"] = counts
            for name, t in per_layer.items():
                (a50, a99), (r50, r99), (t50, t99) = (_percentiles_us(t[k]) for k in ("acquire", "release", "total"))
                rows.append([str(nchunks), name, f"{a50:.1f}", f"{a99:.1f}", f"{r50:.1f}", f"{r99:.1f}",
                             f"{t50:.1f}", f"{t99:.1f}"])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pool_cpu_path.json").write_text(json.dumps(
        {"iterations": args.iterations, "warmup": args.warmup, "python": sys.version.split()[0],
         "cpu_only_fake_driver": True, "results": results}, indent=1))
    print_table(f"Host side of one dynamic call on the pool, CPU only, CUDA faked (no GPU figure), "
                f"{args.iterations} calls after {args.warmup} (µs; each layer includes those above it)",
                ["chunks", "layer", "acquire p50", "acquire p99", "give back p50", "give back p99",
                 "total p50", "total p99"], rows)


# --- GPU: the whole per-call path ---------------------------------------------------------------


def gpu(args: argparse.Namespace) -> None:
    from engine_runtime import _cuda
    from engine_runtime.memory.arena import VmmArena
    from engine_runtime.memory.pool import connect_or_start, pool_available

    rt = _cuda.runtime()
    _cuda._check("cudaSetDevice", rt.cudaSetDevice(args.device)[0])
    _cuda._check("cudaFree", rt.cudaFree(0)[0])
    support = pool_available(args.device)
    if not support:
        sys.exit(f"pool unavailable: {support.reason} (use --quick on a CPU host)")
    lease_bytes = int(args.lease_gib * GiB)
    dev = args.device

    def time_calls(fn) -> tuple[float, float]:
        times = []
        for i in range(args.iterations + args.warmup):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return summarize(times)

    # Baselines in this process.
    owned = VmmArena(dev, lease_bytes)
    own50, own90 = time_calls(lambda: owned.allocate(lease_bytes).release())
    owned.close()
    with _cuda.device(dev):
        handle = _cuda.mem_create(dev, lease_bytes)
        base = _cuda.address_reserve(lease_bytes, _cuda.granularity(dev))

        def premade() -> None:
            _cuda.mem_map(base, lease_bytes, handle)
            _cuda.set_access(dev, base, lease_bytes)
            _cuda.mem_unmap(base, lease_bytes)

        pre50, pre90 = time_calls(premade)
        _cuda.address_free(base, lease_bytes)
        _cuda.mem_release(handle)

    rows, full, kept, lease_only = [], [], [], []
    for chunk_mib in args.chunks_mib:
        chunk = chunk_mib * MiB
        nchunks = -(-lease_bytes // chunk)
        with tempfile.TemporaryDirectory(prefix="ebbb", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as d:
            client = connect_or_start(dev, chunk_bytes=chunk, initial_chunks=nchunks, directory=d, idle_exit_s=30.0)
            try:
                l50, l90 = time_calls(lambda: client.acquire(lease_bytes, 1.0).release())
                # Every call maps and unmaps (what a call pays when another replica took
                # its chunks meanwhile) ...
                arena = VmmArena(dev, lease_bytes, source=client, deadline_s=5.0, keep_mapped=False)
                f50, f90 = time_calls(lambda: arena.allocate(lease_bytes).release())
                arena.close()
                # ... and back-to-back calls of one replica that left its chunks mapped.
                arena = VmmArena(dev, lease_bytes, source=client, deadline_s=5.0, keep_mapped=True)
                k50, k90 = time_calls(lambda: arena.allocate(lease_bytes).release())
                arena.close()
            finally:
                client.shutdown_owner()
                client.close()
        full.append(f50)
        kept.append(k50)
        lease_only.append(l50)
        rows.append([str(chunk_mib), str(nchunks), f"{l50:.1f}", f"{f50:.1f}", f"{f90:.1f}",
                     "yes" if f50 <= 150 else "no", f"{k50:.1f}", f"{k90:.1f}"])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "bench_pool.png", f"{args.lease_gib:g} GiB lease + map + unmap + return (cuda:{dev})",
         args.chunks_mib, {"pool: lease+map+unmap+return": full, "pool: mapping kept from the last call": kept,
                           "pool: lease+return only": lease_only},
         {"created per call (OwnedPhysical)": own50, "premade, one allocation": pre50})
    print_table(f"Baselines for {args.lease_gib:g} GiB, {args.iterations} runs (µs)",
                ["mechanism", "p50", "p90"],
                [["create+map+unmap+release per call", f"{own50:.1f}", f"{own90:.1f}"],
                 ["premade single allocation, map+unmap", f"{pre50:.1f}", f"{pre90:.1f}"]])
    print_table(f"Pool, {args.lease_gib:g} GiB per call, {args.iterations} runs (µs); target <= 150 µs",
                ["chunk MiB", "chunks", "lease+return p50", "full p50", "full p90", "full meets target",
                 "mapping kept p50", "mapping kept p90"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-only smoke: the lease table, no CUDA")
    parser.add_argument("--cpu-path", action="store_true",
                        help="CPU only, CUDA faked: the host side of a dynamic call on the pool, layer by layer")
    parser.add_argument("--cpu-chunks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16],
                        help="--cpu-path: chunks per call (1 GiB is 16 chunks of the default 64 MiB)")
    parser.add_argument("--profile", action="store_true", help="--cpu-path: cProfile the kept-chunks call too")
    parser.add_argument("--out-dir", default="bench_out", help="where the PNG goes")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--lease-gib", type=float, default=1.0)
    parser.add_argument("--chunks-mib", type=lambda s: [int(x) for x in s.split(",")], default=[2, 32, 128, 512, 1024])
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args()
    if args.iterations is None:
        args.iterations = 200 if args.quick else 5000 if args.cpu_path else 100
    if args.warmup is None:
        args.warmup = 200 if args.cpu_path else 10
    if args.cpu_path:
        cpu_path(args)
    elif args.quick:
        quick(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()
