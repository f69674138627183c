"""Where a dynamic call's time goes: mapping, the graph's own GPU time, unmapping.

One captured batch bucket of a model, device-resident input (no host copies, so the
figures isolate the memory mechanism), per call:

- ``static``: the arena stays mapped (Ebb's static mode);
- ``premade``: physical memory made once, mapped and unmapped per call (what the
  per-GPU pool gives, without its lease table);
- ``owned``: physical memory created, mapped, unmapped and released per call
  (Ebb's dynamic mode without the pool).

GPU replay time comes from CUDA events around the replay; map/unmap from the host
clock. Prints a table last and writes a PNG.

    python3 scripts/bench_remap.py                 # GPU: ResNet-50 b32 and ResNet-152 b100
    python3 scripts/bench_remap.py --quick         # CPU smoke: checks the script runs; no figures
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [("resnet50", 32), ("resnet152", 100)]
MODES = ("static", "premade", "owned")


def measure(arch: str, batch: int, calls: int, rounds: int) -> list[dict]:
    import torch

    from engine_runtime import _cuda
    from engine_runtime.memory.arena import OwnedPhysical, PhysicalLease
    from engine_runtime.backends.pytorch import PyTorchEngine

    engine = PyTorchEngine.from_architecture("remap", arch, max_batch=batch, min_batch=batch, device="cuda",
                                             mode="dynamic")
    engine.warm()
    bucket, arena, stream = engine._buckets[batch], engine._arena, engine._stream
    x = torch.randn(batch, 3, 224, 224, device="cuda")

    class Premade:
        """One physical allocation, lent again and again (never released per call)."""

        mechanism = OwnedPhysical.mechanism

        def __init__(self, nbytes: int) -> None:
            self.handle, self.nbytes = _cuda.mem_create(0, nbytes), nbytes

        def acquire(self, nbytes: int, deadline_s: float) -> PhysicalLease:
            return PhysicalLease([(self.handle, self.nbytes)], self.nbytes, None)

    rows = []
    try:
        for _ in range(rounds):
            for mode in MODES:
                premade = Premade(_cuda.round_up(bucket.context_bytes, arena.granularity)) if mode == "premade" else None
                held = arena.allocate(bucket.context_bytes, (bucket.offset,)) if mode == "static" else None
                t_map, t_gpu, t_unmap, t_total = [], [], [], []
                for i in range(calls + 5):
                    t0 = time.perf_counter()
                    block = held or arena.allocate(bucket.context_bytes, (bucket.offset,), source=premade)
                    t1 = time.perf_counter()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    with torch.cuda.stream(stream):
                        bucket.static_input.copy_(x)
                        start.record(stream)
                        bucket.graph.replay()
                        end.record(stream)
                    stream.synchronize()
                    t2 = time.perf_counter()
                    if held is None:
                        block.release()
                    t3 = time.perf_counter()
                    if i >= 5:
                        t_map.append(t1 - t0)
                        t_gpu.append(start.elapsed_time(end) / 1e3)
                        t_unmap.append(t3 - t2)
                        t_total.append(t3 - t0)
                if held is not None:
                    held.release()
                if premade is not None:
                    _cuda.mem_release(premade.handle)
                rows.append({"model": f"{arch}-b{batch}", "mode": mode, "context_mib": bucket.context_bytes / 2**20,
                             **{k: float(np.median(v)) * 1e3 for k, v in
                                (("map_ms", t_map), ("gpu_replay_ms", t_gpu), ("unmap_ms", t_unmap),
                                 ("total_ms", t_total))}})
    finally:
        engine.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke: no GPU, no figures")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2, help="each mode measured this many times, interleaved")
    p.add_argument("--out-dir", default="out")
    args = p.parse_args(argv)
    import torch

    if args.quick or not torch.cuda.is_available():
        print("bench_remap: CUDA VMM needs an NVIDIA GPU; nothing to measure on this host (smoke run only).")
        return 0
    rows = [r for arch, batch in CASES for r in measure(arch, batch, args.calls, args.rounds)]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "remap.json").write_text(json.dumps({"card": torch.cuda.get_device_name(0), "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    bottom = np.zeros(len(rows))
    for key in ("map_ms", "gpu_replay_ms", "unmap_ms"):
        vals = np.array([r[key] for r in rows])
        ax.bar(labels, vals, bottom=bottom, label=key)
        bottom += vals
    ax.set_ylabel("ms (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "remap.png", dpi=110)
    static = {(r["model"]): r["total_ms"] for r in rows if r["mode"] == "static"}
    print(f"\n{torch.cuda.get_device_name(0)}: medians of {args.calls} calls, device-resident input")
    print("| model | mode | context MiB | map ms | GPU replay ms | unmap ms | total ms | vs static |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['context_mib']:.0f} | {r['map_ms']:.3f} | {r['gpu_replay_ms']:.3f} | "
              f"{r['unmap_ms']:.3f} | {r['total_ms']:.3f} | {(r['total_ms'] / static[r['model']] - 1) * 100:+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
