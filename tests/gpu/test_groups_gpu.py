"""Model groups on a GPU: several ResNet-50 engines in one EngineGroup (``pytest -m gpu -s``).

In a fresh process (this file run as a script), in this order:
1. CUDA's stack limit is set to 256 bytes first, then the process floor is measured
   (CUDA + cuBLAS + cuDNN initialised, caches empty, before any engine).
2. Five ResNet-50 engines (different seeds, CUDA graphs in VMM arenas, weights in VMM
   ranges) join one group whose GPU weights budget holds three.
3. Dynamic mode: every model's first output is its reference; round-robin calls page
   weights out to pinned host memory and back; every output stays bit-identical, every
   parameter's device address stays the same, the budget is never exceeded, and between
   calls the process holds at most baseline + resident weights + 64 MiB (NVML).
4. Static mode: the same, outputs bit-identical to dynamic's.
5. The stack limit is still 256, and setting it now is refused (graphs were captured).
6. Page-in of one model's weights is timed beside a pinned host-to-device copy of the
   same bytes measured in the same process (printed; the benchmark reports the target).
7. close() brings the process back within 64 MiB of the baseline.

The baseline for the memory bound is the floor plus the kernels ResNet-50 loads on
first use (CUDA's lazy module loading; every process serving the model pays them,
``test_pytorch_gpu`` says why); the bound against the bare floor is printed beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20
ALLOWANCE_BYTES = 64 * MiB
RESULT_PREFIX = "EBB_GROUPS_GPU_RESULT "
STACK_LIMIT = 256
MODELS = 5
RESIDENT = 3
BATCH = 8


def _run_worker() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=540)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"groups GPU worker failed (exit {proc.returncode})\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-8000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def test_group_pages_weights_with_graphs_bit_identical_and_memory_bounded(capsys):
    r = _run_worker()
    assert r["floor_bytes"] is not None, "the process floor was not measured (NVML?)"
    mib = lambda n: f"{n / MiB:,.0f} MiB"  # noqa: E731
    with capsys.disabled():
        print(f"\n== groups on {r['device']}: {MODELS} ResNet-50 b{BATCH}, budget {mib(r['budget_bytes'])} "
              f"({RESIDENT} models), NVML source {r['memory_source']}")
        print(f"stack limit {r['stack_limit_before']} -> {r['stack_limit_set']} bytes; at the end "
              f"{r['stack_limit_end']}; set after capture refused: {r['refused_after_capture']}")
        print(f"floor (CUDA + cuBLAS + cuDNN, limit set) {mib(r['floor_bytes'])}; + ResNet-50's kernels "
              f"{mib(r['baseline_bytes'])}")
        worst = max(r["idle"], key=lambda s: s["used"] - s["resident"])
        print(f"idle between calls, worst: {mib(worst['used'])} with {mib(worst['resident'])} resident = "
              f"baseline {(worst['used'] - worst['resident'] - r['baseline_bytes']) / MiB:+,.0f} MiB, "
              f"floor {(worst['used'] - worst['resident'] - r['floor_bytes']) / MiB:+,.0f} MiB (allowance 64)")
        print(f"page-ins {r['page_ins']}, page-outs {r['page_outs']}; one page-in "
              f"{r['page_in_s'] * 1e3:.2f} ms vs pinned copy of {mib(r['weights_bytes'])} "
              f"{r['pinned_copy_s'] * 1e3:.2f} ms ({r['pinned_gbps']:.1f} GB/s): "
              f"{r['page_in_s'] / r['pinned_copy_s']:.2f}x")
        print(f"p50 dynamic {r['p50_dynamic_ms']:.2f} ms resident, {r['p50_paging_ms']:.2f} ms with a page-in; "
              f"static {r['p50_static_ms']:.2f} ms; after close {mib(r['after_close_bytes'])}")
    assert r["stable_weights"], f"weights are not in VMM ranges: {r['stable_weights_error']}"
    assert r["mechanism"] == "vmm-arena", f"mechanism {r['mechanism']}: no CUDA graphs"
    assert r["stack_limit_set"] == STACK_LIMIT and r["stack_limit_end"] == STACK_LIMIT
    assert r["refused_after_capture"]
    assert r["distinct_models"], "two models with different seeds answered the same"
    assert r["page_outs"] >= MODELS and r["page_ins"] >= MODELS, "the round-robin never paged"
    assert r["dynamic_mismatches"] == [], f"outputs changed after page-out/page-in: {r['dynamic_mismatches']}"
    assert r["static_mismatches"] == [], f"static outputs differ from dynamic: {r['static_mismatches']}"
    assert r["moved_addresses"] == [], f"parameters moved: {r['moved_addresses']}"
    assert r["max_resident_bytes"] <= r["budget_bytes"]
    over = [s for s in r["idle"] if s["used"] > r["baseline_bytes"] + s["resident"] + ALLOWANCE_BYTES]
    assert not over, (f"{len(over)} idle readings over baseline + resident weights + 64 MiB, worst "
                      f"{max((s['used'] - s['resident'] - r['baseline_bytes']) / MiB for s in over):.0f} MiB over")
    assert r["close_to_eager"], f"model 0 differs from eager PyTorch by {r['eager_max_abs_diff']}"
    assert r["after_close_bytes"] <= r["baseline_bytes"] + ALLOWANCE_BYTES


# -- the worker -------------------------------------------------------------------------


def _measure() -> dict:
    from engine_runtime import EngineGroup, GroupBudget, StackLimitError, cuda_process, set_cuda_stack_limit
    from engine_runtime.cuda_process import ProcessMemory, get_cuda_stack_limit, measure_process_floor

    reader = ProcessMemory()  # before CUDA initialises, for its fallback
    before = get_cuda_stack_limit()
    set_cuda_stack_limit(STACK_LIMIT)
    limit_set = get_cuda_stack_limit()
    floor = measure_process_floor()

    import torch

    from engine_runtime.backends.pytorch import PyTorchEngine
    from engine_runtime.architectures import build

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((BATCH, 3, 224, 224), dtype=np.float32))
    # ResNet-50's kernels (lazy module loading), as every process serving it pays them.
    probe = build("resnet50", seed=0).module.to("cuda")
    with torch.inference_mode():
        probe(x.cuda())
    torch.cuda.synchronize()
    del probe
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    baseline = reader.read()

    def make(i: int):
        return lambda: PyTorchEngine.from_architecture(f"r{i}", "resnet50", max_batch=BATCH, min_batch=BATCH,
                                                       seed=i, device="cuda", mode="dynamic")

    first = make(0)()
    wb = first.weights_device_bytes()
    first.close()
    budget = RESIDENT * wb
    group = EngineGroup(GroupBudget(gpu_weights_budget_bytes=budget, host_tier=True), name="gpu-test")
    names = [f"r{i}" for i in range(MODELS)]
    for i, n in enumerate(names):
        group.add(n, make(i))

    idle: list[dict] = []
    max_resident = 0

    def note() -> None:
        nonlocal max_resident
        torch.cuda.synchronize()
        resident = group.resident_weights_bytes()
        max_resident = max(max_resident, resident)
        idle.append({"used": reader.read(), "resident": resident})

    refs, ptrs = {}, {}
    for n in names:
        refs[n] = group.infer(n, {"input": x})["output"]
        note()
        ptrs[n] = [p.data_ptr() for p in group.engine(n)._module.parameters()]
    engine0 = group.engine(names[0])
    stable = engine0._weights is not None
    stable_error = engine0.stable_weights_error
    mechanism = engine0.mechanism.value

    mismatches, lat_paging, lat_resident = [], [], []
    for rnd in range(3):
        for n in names:
            paging = group.engine(n).weights_tier.value != "gpu"
            t0 = time.perf_counter()
            out = group.infer(n, {"input": x})["output"]
            (lat_paging if paging else lat_resident).append(time.perf_counter() - t0)
            note()
            if not torch.equal(out, refs[n]):
                mismatches.append(f"{n} round {rnd}: max diff {float((out - refs[n]).abs().max())}")
            t0 = time.perf_counter()
            group.infer(n, {"input": x})  # resident now
            lat_resident.append(time.perf_counter() - t0)
    moved = [n for n in names if [p.data_ptr() for p in group.engine(n)._module.parameters()] != ptrs[n]]

    # One page-in beside a pinned host-to-device copy of the same bytes.
    target = names[0]
    group.ensure_resident(target)  # then its page-out leaves the room its page-in needs
    page_ins = []
    for _ in range(5):
        group.page_out(target)
        page_ins.append(group.ensure_resident(target))
    page_in_s = float(np.median(page_ins))
    host = torch.empty(wb, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(wb, dtype=torch.uint8, device="cuda")
    copies = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    pinned_s = float(np.median(copies))
    del host, dev
    torch.cuda.empty_cache()

    group.set_mode("static")
    static_mismatches, lat_static = [], []
    for rnd in range(2):
        for n in names:
            t0 = time.perf_counter()
            out = group.infer(n, {"input": x})["output"]
            lat_static.append(time.perf_counter() - t0)
            if not torch.equal(out, refs[n]):
                static_mismatches.append(f"{n} round {rnd}: max diff {float((out - refs[n]).abs().max())}")
    group.set_mode("dynamic")
    note()

    limit_end = get_cuda_stack_limit()
    try:
        set_cuda_stack_limit(STACK_LIMIT)
        refused = False
    except StackLimitError:
        refused = True
    status = group.status()
    group.close()
    torch.cuda.synchronize()
    after_close = reader.read()

    eager = build("resnet50", seed=0).module.to("cuda")
    with torch.inference_mode():
        ref_eager = eager(x.cuda()).cpu()
    scale = float(ref_eager.abs().max())
    close = bool(torch.allclose(refs[names[0]], ref_eager, rtol=1e-3, atol=1e-3 * max(scale, 1.0)))
    return {
        "device": torch.cuda.get_device_name(0),
        "memory_source": reader.source,
        "stack_limit_before": before, "stack_limit_set": limit_set, "stack_limit_end": limit_end,
        "refused_after_capture": refused, "graphs_captured": cuda_process.graphs_captured(),
        "floor_bytes": floor, "baseline_bytes": baseline, "budget_bytes": budget, "weights_bytes": wb,
        "stable_weights": stable, "stable_weights_error": stable_error, "mechanism": mechanism,
        "idle": idle, "max_resident_bytes": max_resident,
        "dynamic_mismatches": mismatches, "static_mismatches": static_mismatches, "moved_addresses": moved,
        "distinct_models": not torch.equal(refs[names[0]], refs[names[1]]),
        "page_ins": sum(s.page_ins for s in status), "page_outs": sum(s.page_outs for s in status),
        "page_in_s": page_in_s, "pinned_copy_s": pinned_s, "pinned_gbps": wb / pinned_s / 1e9,
        "p50_dynamic_ms": float(np.median(lat_resident)) * 1e3,
        "p50_paging_ms": float(np.median(lat_paging)) * 1e3 if lat_paging else float("nan"),
        "p50_static_ms": float(np.median(lat_static)) * 1e3,
        "after_close_bytes": after_close,
        "close_to_eager": close, "eager_max_abs_diff": float((refs[names[0]] - ref_eager).abs().max()),
    }


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(_measure()), flush=True)
