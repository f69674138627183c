"""Memory and latency per mode (issue 5, item 1): plain PyTorch vs Ebb static vs Ebb dynamic.

For each model (ResNet-50 b32, ResNet-152 b100, BERT-base seq 128 b32, random weights,
fp32) and each configuration

- ``plain``: eager PyTorch as a plain Ray Serve replica runs it (``model.cuda()``,
  ``torch.inference_mode``, PyTorch's caching allocator keeps whatever a call used),
- ``ebb-static``: Ebb's PyTorch engine, context memory held (captured CUDA graph),
- ``ebb-dynamic``: the same engine, context memory mapped for each call only,
- ``ebb-pool``: dynamic, with physical memory leased per call from the GPU's shared
  context pool (``engine_runtime.memory.pool``, 128 MiB chunks) instead of created per call;
  the pool lives in its owner process, so this row's idle figure excludes it (the
  pool's size is reported beside it). The replica leaves its chunks mapped between
  calls (``keep_mapped``, the default) and, alone on the pool, gets the same ones back:
  the best case,
- ``ebb-pool-remap``: the same with ``keep_mapped`` off, so every call maps and unmaps
  its chunks: the worst case (every call finds its chunks taken by another replica),

a fresh subprocess loads the model and reports its NVML per-process memory after
loading, between calls (idle) and at peak (NVML sampled from a thread during calls),
and host-clock latency p50/p99 over ``--calls`` synchronised calls after warm-up.
Every call takes a host tensor and returns a host tensor, as a replica's does.

Each process first initialises CUDA, cuBLAS and cuDNN and empties PyTorch's caches;
NVML's figure then is the *baseline* every replica pays before any model (see
``warm_cuda_libraries``). "Floor" below is baseline + weights, and the issue's target
for an idle dynamic replica is at most floor + 64 MiB.

    .venv/bin/python scripts/bench_modes.py                    # GPU, all three models
    .venv/bin/python scripts/bench_modes.py --serve            # + plain as a real Ray Serve replica
    .venv/bin/python scripts/bench_modes.py --quick            # CPU smoke run for CI

Prints a markdown table last; writes ``modes.json`` and ``modes.png`` to ``--out-dir``.
On a CPU (``--quick``) there is no NVML: memory columns are empty.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_runtime import cuda_process  # noqa: E402
from engine_runtime.cuda_process import ProcessMemory  # noqa: E402
from engine_runtime.units import MiB
from engine_runtime.stats import time_calls  # noqa: E402

#: Issue 5's allowance for an idle dynamic replica above CUDA context + weights.
IDLE_ALLOWANCE_BYTES = 64 * MiB
#: Issue 5's dynamic-over-static p50 overhead targets, by architecture.
OVERHEAD_TARGET_PCT = {"resnet50": 5.0, "resnet152": 2.0}
#: The cases issue 14 holds the serving path to (static <= plain eager, pool <= static + 2%).
SERVING_PATH_MODELS = ("resnet18-b4", "resnet50-b32")
#: Marks the one stdout line a worker returns its result on.
RESULT_PREFIX = "EBB_BENCH_RESULT "
#: Chunk of the shared pool in the ebb-pool row: the measured trade-off (H200, 1 GiB lease:
#: 32 MiB chunks 1.2 ms, 128 MiB 0.39 ms, 512 MiB 0.15 ms) against rounding waste.
POOL_CHUNK_BYTES = 128 * MiB
#: Enough for the largest context here (ResNet-152 b100: 1,348 MiB).
POOL_CHUNKS = 12
CONFIGS = ("plain", "ebb-static", "ebb-dynamic", "ebb-pool", "ebb-pool-remap")
POOL_CONFIGS = ("ebb-pool", "ebb-pool-remap")


@dataclass(frozen=True)
class ModelCase:
    arch: str
    batch: int
    image_size: int = 224
    seq_len: int = 128


MODELS = {
    "resnet18-b4": ModelCase("resnet18", 4),
    "resnet50-b32": ModelCase("resnet50", 32),
    "resnet152-b100": ModelCase("resnet152", 100),
    "bert-base-s128-b32": ModelCase("bert-base", 32, seq_len=128),
}
QUICK_MODELS = {
    "resnet18-b2": ModelCase("resnet18", 2, image_size=64),
    "bert-tiny-s16-b2": ModelCase("bert-tiny", 2, seq_len=16),
}


# -- measuring (also used by tests/gpu/test_pytorch_gpu.py) ----------------------------


class NvmlProcessMemory(ProcessMemory):
    """The project's one NVML reader (``engine_runtime.cuda_process.ProcessMemory``: this
    process's bytes on its first visible device, per-process list with the device-delta
    fallback), plus the card's name and driver for the benchmark's header. Construct it
    *before* CUDA is initialised, for that fallback to mean anything."""

    def __init__(self) -> None:
        super().__init__()
        self.device_name = _text(self._nvml.nvmlDeviceGetName(self.handle))
        self.driver_version = _text(self._nvml.nvmlSystemGetDriverVersion())


class PeakSampler:
    """Samples a reader from a thread while a block runs; ``peak`` is the largest reading."""

    def __init__(self, read, interval_s: float = 0.0005) -> None:
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self.peak = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self.samples += 1
            # Paces the sampler so it does not take the GIL from the calls it watches.
            self._stop.wait(self._interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def warm_cuda_libraries(device: torch.device) -> None:
    """The baseline every replica pays (``engine_runtime.cuda_process.warm_cuda_libraries``:
    CUDA, cuBLAS and cuDNN initialised, caches handed back). Kernels the model itself
    loads later (lazy module loading, the default) are not in it: they fall inside the
    64 MiB allowance."""
    cuda_process.warm_cuda_libraries(device.index or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sample_input(case: ModelCase, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if case.arch.startswith("bert"):
        return torch.from_numpy(rng.integers(0, 30522, (case.batch, case.seq_len), dtype=np.int64))
    return torch.from_numpy(rng.standard_normal((case.batch, 3, case.image_size, case.image_size), dtype=np.float32))


def measure(case: ModelCase, config: str, *, device_name: str, calls: int, warmup: int, peak_calls: int) -> dict:
    """Load one model in one configuration in this process and measure it."""
    from engine_runtime.backends.pytorch import PyTorchEngine
    from engine_runtime.architectures import build

    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    reader = NvmlProcessMemory() if on_gpu else None
    read = reader.read if reader else (lambda: None)
    if on_gpu:
        warm_cuda_libraries(device)
    baseline = read()

    engine = None
    t0 = time.perf_counter()
    if config == "plain":
        model = build(case.arch, seed=0, image_size=case.image_size, seq_len=case.seq_len)
        module = model.module.to(device)
        weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x.to(device)).cpu()  # .cpu() synchronises
    elif config in ("ebb-static", "ebb-dynamic", *POOL_CONFIGS):
        pool = None
        if config in POOL_CONFIGS:
            from engine_runtime.memory.pool import connect_or_start

            chunk = int(os.environ.get("EBB_BENCH_POOL_CHUNK_MIB", POOL_CHUNK_BYTES // MiB)) * MiB
            pool = connect_or_start(device.index or 0, chunk_bytes=chunk,
                                    initial_chunks=-(-POOL_CHUNKS * POOL_CHUNK_BYTES // chunk),
                                    idle_exit_s=30.0, keep_mapped=config == "ebb-pool")
        engine = PyTorchEngine.from_architecture(
            f"{case.arch}-b{case.batch}", case.arch, max_batch=case.batch, min_batch=case.batch,
            image_size=case.image_size, seq_len=case.seq_len, seed=0, device=device_name,
            mode="static" if config == "ebb-static" else "dynamic", physical_source=pool)
        engine.warm()
        weights = engine.describe().weights_bytes
        input_name = engine.describe().input_names[0]
        output_name = engine.describe().output_names[0]

        def run(x: torch.Tensor) -> torch.Tensor:
            return engine.infer({input_name: x})[output_name]  # synchronised before it returns
    else:
        raise ValueError(f"unknown configuration {config!r}; expected one of {list(CONFIGS)}")
    load_s = time.perf_counter() - t0
    after_load = read()

    x = _sample_input(case)
    # The one timing method (engine_runtime.stats.time_calls), shared with tests/gpu.
    timed = time_calls(lambda: run(x), calls=calls, warmup=warmup)
    idle = read()
    peak = None
    if on_gpu:
        with PeakSampler(read) as sampler:
            for _ in range(peak_calls):
                run(x)
        peak = max(sampler.peak, idle, after_load)
    result = {
        "arch": case.arch,
        "batch": case.batch,
        "config": config,
        "device": reader.device_name if reader else platform.processor() or "cpu",
        "memory_source": reader.source if reader else None,
        "weights_bytes": weights,
        "baseline_bytes": baseline,
        "after_load_bytes": after_load,
        "idle_bytes": idle,
        "peak_bytes": peak,
        "load_s": load_s,
        "calls": calls,
        "p50_s": timed.p50_s,
        "p99_s": timed.p99_s,
    }
    if engine is not None:
        snap = engine.stats()
        result.update(mechanism=engine.mechanism.value, context_bytes=snap.last_context_bytes or snap.peak_context_bytes,
                      acquisition_p50_s=snap.acquisition_p50_s, acquisition_p99_s=snap.acquisition_p99_s)
        counts = engine.mapping_counts()
        if counts is not None:
            # Pieces mapped vs found still mapped: whether keep_mapped saved the remaps it should.
            result["mapping_counts"] = dict(counts)
        engine.close()
        if pool is not None:
            snap_pool = pool.snapshot()
            result["pool_bytes"] = snap_pool.capacity * snap_pool.chunk_bytes
            pool.shutdown_owner()
            pool.close()
    return result


# -- one subprocess per configuration ------------------------------------------------------


def _worker_main(args: argparse.Namespace) -> int:
    case = {**MODELS, **QUICK_MODELS}[args.worker_model]
    if args.worker_config == "plain-serve":
        result = _measure_in_serve(case, args)
    else:
        result = measure(case, args.worker_config, device_name=args.device, calls=args.calls,
                         warmup=args.warmup, peak_calls=args.peak_calls)
    result["model"] = args.worker_model
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def _measure_in_serve(case: ModelCase, args: argparse.Namespace) -> dict:
    """The plain configuration inside a real Ray Serve replica (fractional GPU, as users deploy)."""
    import ray
    from ray import serve

    # A quarter of a GPU, as users pack replicas; none for the CPU smoke run.
    num_gpus = 0.25 if args.device.startswith("cuda") else 0

    @serve.deployment(ray_actor_options={"num_gpus": num_gpus})
    class PlainReplica:
        def measure(self, case: ModelCase, kwargs: dict) -> dict:
            return measure(case, "plain", **kwargs)

    ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "scripts")])}},
             include_dashboard=False)
    try:
        handle = serve.run(PlainReplica.bind(), name="bench-modes-plain", route_prefix=None)
        kwargs = dict(device_name=args.device, calls=args.calls, warmup=args.warmup, peak_calls=args.peak_calls)
        result = handle.measure.remote(case, kwargs).result(timeout_s=600)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["config"] = "plain-serve"
    return result


def _run_worker(model_key: str, config: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-model", model_key, "--worker-config", config,
           "--device", args.device, "--calls", str(args.calls), "--warmup", str(args.warmup),
           "--peak-calls", str(args.peak_calls)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{model_key}/{config} worker failed (exit {proc.returncode}); stdout:\n{proc.stdout}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    print(f"  {model_key:<20} {config:<12} p50 {result['p50_s'] * 1e3:8.2f} ms  idle {_mib(result['idle_bytes'])} MiB"
          f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return result


# -- reporting -------------------------------------------------------------------------------


def _mib(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / MiB:,.0f}"


def _annotate(results: list[dict]) -> None:
    """Add floors and overheads, which compare rows of one model."""
    static_p50 = {r["model"]: r["p50_s"] for r in results if r["config"] == "ebb-static"}
    for r in results:
        if r["baseline_bytes"] is not None:
            r["floor_bytes"] = r["baseline_bytes"] + r["weights_bytes"]
            r["idle_over_floor_bytes"] = r["idle_bytes"] - r["floor_bytes"]
        ref = static_p50.get(r["model"])
        r["p50_vs_static_pct"] = (r["p50_s"] / ref - 1) * 100 if ref else None


def _targets(results: list[dict]) -> list[str]:
    lines = []
    plain_p50 = {r["model"]: r["p50_s"] for r in results if r["config"] == "plain"}
    for r in results:
        if r["config"] not in ("ebb-dynamic", *POOL_CONFIGS):
            continue
        target = OVERHEAD_TARGET_PCT.get(r["arch"])
        if target is not None and r["p50_vs_static_pct"] is not None:
            pct = r["p50_vs_static_pct"]
            verdict = "met" if pct <= target else f"missed by {pct - target:.1f} points"
            lines.append(f"- {r['model']} {r['config']}: p50 overhead over ebb-static {pct:+.1f}% "
                         f"(target <= {target:.0f}%): {verdict}")
        plain = plain_p50.get(r["model"])
        if r["config"] in POOL_CONFIGS and plain and r["arch"] in OVERHEAD_TARGET_PCT:
            # Issue 8: dynamic through the pool no slower than static eager PyTorch.
            diff_ms = (r["p50_s"] - plain) * 1e3
            verdict = "met" if diff_ms <= 0 else f"missed by {diff_ms:.2f} ms"
            lines.append(f"- {r['model']} {r['config']}: p50 {r['p50_s'] * 1e3:.2f} ms vs plain eager "
                         f"{plain * 1e3:.2f} ms (target: no slower): {verdict}")
        # Issue 14: Ebb static no slower than plain eager; dynamic through the pool at most
        # static + 2%, for ResNet-18 b4 and ResNet-50 b32.
        if r["config"] == "ebb-pool" and r["model"] in SERVING_PATH_MODELS:
            static = next((s["p50_s"] for s in results if s["model"] == r["model"] and s["config"] == "ebb-static"), None)
            if static and plain:
                d = (static - plain) * 1e3
                lines.append(f"- {r['model']} ebb-static: p50 {static * 1e3:.2f} ms vs plain eager {plain * 1e3:.2f} ms "
                             f"(target: at most plain): {'met' if d <= 0 else f'missed by {d:.2f} ms'}")
            if static:
                pct = (r["p50_s"] / static - 1) * 100
                lines.append(f"- {r['model']} ebb-pool: p50 {r['p50_s'] * 1e3:.2f} ms vs ebb-static {static * 1e3:.2f} ms, "
                             f"{pct:+.1f}% (target <= +2%): {'met' if pct <= 2.0 else f'missed by {pct - 2.0:.1f} points'}")
        if r.get("idle_over_floor_bytes") is not None:
            over = r["idle_over_floor_bytes"]
            verdict = "met" if over <= IDLE_ALLOWANCE_BYTES else f"missed by {(over - IDLE_ALLOWANCE_BYTES) / MiB:.0f} MiB"
            lines.append(f"- {r['model']}: idle dynamic {over / MiB:+.0f} MiB over context + weights "
                         f"(target <= 64 MiB): {verdict}")
    return lines


def markdown_table(results: list[dict]) -> str:
    head = ("| model | config | weights MiB | baseline MiB | after load MiB | idle MiB | peak MiB "
            "| idle − floor MiB | p50 ms | p99 ms | p50 vs ebb-static |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        over = r.get("idle_over_floor_bytes")
        vs = r.get("p50_vs_static_pct")
        rows.append(
            f"| {r['model']} | {r['config']} | {_mib(r['weights_bytes'])} | {_mib(r['baseline_bytes'])} "
            f"| {_mib(r['after_load_bytes'])} | {_mib(r['idle_bytes'])} | {_mib(r['peak_bytes'])} "
            f"| {'—' if over is None else f'{over / MiB:+,.0f}'} | {r['p50_s'] * 1e3:.2f} | {r['p99_s'] * 1e3:.2f} "
            f"| {'—' if vs is None else f'{vs:+.1f}%'} |")
    return "\n".join(rows)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    configs = list(dict.fromkeys(r["config"] for r in results))
    by_key = {(r["model"], r["config"]): r for r in results}
    measured = any(r["idle_bytes"] is not None for r in results)
    width = 0.8 / len(configs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_mem, ax_lat) = plt.subplots(2, 1, figsize=(max(8, 3 * len(models)), 9))
    for j, config in enumerate(configs):
        xs, idle, peak, p50, p99, floor = [], [], [], [], [], []
        for i, model in enumerate(models):
            r = by_key.get((model, config))
            if r is None:
                continue
            xs.append(i + (j - (len(configs) - 1) / 2) * width)
            idle.append((r["idle_bytes"] or 0) / MiB)
            peak.append((r["peak_bytes"] or 0) / MiB)
            floor.append(r.get("floor_bytes", 0) / MiB)
            p50.append(r["p50_s"] * 1e3)
            p99.append(r["p99_s"] * 1e3)
        color = colors[j % len(colors)]
        ax_lat.bar(xs, p50, width * 0.9, color=color, label=config,
                   yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]], capsize=3)
        if not measured:
            continue
        ax_mem.bar(xs, peak, width * 0.9, color=color, alpha=0.35, label=f"{config} peak")
        ax_mem.bar(xs, idle, width * 0.9, color=color, label=f"{config} idle")
        ax_mem.hlines(floor, [x - width * 0.45 for x in xs], [x + width * 0.45 for x in xs], colors="black",
                      linestyles="dotted", label="context + weights" if j == 0 else None)
    for ax in (ax_mem, ax_lat) if measured else (ax_lat,):
        ax.set_xticks(range(len(models)), models)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    ax_mem.set_ylabel("NVML per-process memory (MiB)")
    ax_mem.set_title("Memory between calls (solid) and at peak (light)")
    if not measured:
        ax_mem.set_axis_off()
        ax_mem.text(0.5, 0.5, "no GPU: NVML memory not measured", ha="center", va="center", transform=ax_mem.transAxes)
    ax_lat.set_ylabel("latency (ms), bar p50, whisker p99")
    ax_lat.set_title(f"Latency per call ({results[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="./out", help="where modes.json and modes.png go (default ./out)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run on the CPU: ResNet-18 b2 and BERT-tiny, a few calls")
    parser.add_argument("--serve", action="store_true",
                        help="add plain as a real Ray Serve replica (num_gpus 0.25) where ray imports")
    parser.add_argument("--models", nargs="+", choices=[*MODELS, *QUICK_MODELS],
                        help="models to run (default: all three, or the quick ones)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default cuda, cpu with --quick)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per configuration (default 100)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10)")
    parser.add_argument("--peak-calls", type=int, default=None, help="calls sampled for peak memory (default 20)")
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.calls = args.calls or (5 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
    args.peak_calls = args.peak_calls if args.peak_calls is not None else (2 if args.quick else 20)
    if args.worker_model:
        return _worker_main(args)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on the GPU machine, or use --quick for the CPU smoke run")
    model_keys = args.models or list(QUICK_MODELS if args.quick else MODELS)
    # The shared pool needs CUDA VMM with shareable handles: GPU only.
    configs = [c for c in CONFIGS if c not in POOL_CONFIGS or args.device.startswith("cuda")]
    if args.serve:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("--serve: ray is not importable here; skipping the Ray Serve row", file=sys.stderr)
        else:
            configs.insert(1, "plain-serve")
    started = time.perf_counter()
    results = []
    for key in model_keys:
        for config in configs:
            results.append(_run_worker(key, config, args))
    _annotate(results)

    os.makedirs(args.out_dir, exist_ok=True)
    report = {
        "benchmark": "bench_modes",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, os.getcwd()), *sys.argv]),
        "device": results[0]["device"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "calls": args.calls,
        "warmup": args.warmup,
        "wall_s": time.perf_counter() - started,
        "results": results,
        "targets": _targets(results),
    }
    json_path = os.path.join(args.out_dir, "modes.json")
    png_path = os.path.join(args.out_dir, "modes.png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    plot(results, png_path)
    print(f"\n{report['device']}, torch {torch.__version__}, {args.calls} calls after {args.warmup} warm-up, "
          f"{report['wall_s']:.0f} s; wrote {json_path} and {png_path}")
    if report["targets"]:
        print("Targets (issue 5):\n" + "\n".join(report["targets"]))
    print()
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
