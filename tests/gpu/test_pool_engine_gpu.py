"""Two PyTorch engines in two replica processes sharing one GPU's context pool.

What only the hardware shows, end to end through ``PyTorchEngine(physical_source=)``:

- outputs through the pool (graphs replayed in each process's arena, over chunks the
  other process also leases) equal eager PyTorch's, with both processes calling at once;
- the card's context memory is the pool's size, not the sum of the engines' contexts:
  with the pool sized for one call, NVML's ``used`` over the pool-less floor equals the
  pool, idle and while both engines call at once;
- dynamic p50 with the pool, printed beside static mode and static eager PyTorch.

Run on the GPU machine:  .venv/bin/pytest -m gpu tests/gpu/test_pool_engine_gpu.py -s
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from engine_runtime.units import MiB

pytestmark = pytest.mark.gpu

SPAWN = mp.get_context("spawn")  # CUDA contexts do not survive fork
WAIT_S = 120.0
CHUNK_BYTES = 64 * MiB
ARCH, BATCH = "resnet50", 32
#: NVML's reading moves by a few MiB with nothing to do with the pool (driver bookkeeping).
SLACK_BYTES = 32 * MiB
CALLS = 100  # as bench_modes (time_calls: 10 warm-up, then these)


def _input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, 3, 224, 224), dtype=np.float32)


def _p50_ms(fn, n: int) -> float:
    # The one timing method bench_modes uses too (issue 14): same warm-up, same loop.
    from engine_runtime.stats import time_calls

    return time_calls(fn, calls=n, warmup=10).p50_s * 1e3


# --- the replica process -------------------------------------------------------------------


def _replica(socket_path: str, seed: int, commands, out) -> None:
    """One replica: a dynamic PyTorchEngine on the pool; answers the parent's commands."""
    import torch

    from engine_runtime.backends.pytorch import PyTorchEngine
    from engine_runtime.architectures import build
    from engine_runtime.memory.pool import PoolPhysical

    x = _input(seed)
    pool = PoolPhysical(socket_path, 0, grow_limit_chunks=64)
    engine = PyTorchEngine.from_architecture(f"pool-{seed}", ARCH, max_batch=BATCH, min_batch=BATCH, seed=0,
                                             device="cuda:0", mode="dynamic", physical_source=pool,
                                             admission_deadline_s=WAIT_S)
    try:
        engine.warm()
        # Eager reference (and its p50) first, then its memory goes: the figures below are the engine's.
        eager = build(ARCH, seed=0).module.cuda()
        xh = torch.from_numpy(x)
        with torch.inference_mode():
            ref = eager(xh.cuda()).cpu().numpy()
            eager(xh.cuda())
            torch.cuda.synchronize()
            # The host input, copied per call, as the engine's infer gets it.
            eager_ms = _p50_ms(lambda: eager(xh.cuda()).cpu(), CALLS)
        eager = None  # its memory goes before the engine's figures are read
        torch.cuda.empty_cache()
        out.put({"seed": seed, "pid": os.getpid(), "mechanism": engine.mechanism.value,
                 "context_bytes": engine.context_bytes({"input": (BATCH, 3, 224, 224)}), "eager_ms": eager_ms})
        while True:
            cmd, arg = commands.get(timeout=WAIT_S)
            if cmd == "check":
                got = engine.infer({"input": x})["output"]
                out.put({"seed": seed, "max_abs_diff": float(np.abs(got - ref).max()),
                         "scale": float(np.abs(ref).max()), "identical": bool(np.array_equal(got, ref))})
            elif cmd == "calls":
                for _ in range(arg):
                    engine.infer({"input": x})
                out.put({"seed": seed, "done": arg})
            elif cmd == "p50":
                # Warm up first, as bench_modes does: the GPU sat idle while the parent
                # resized the pool, and the first calls after a pause run slower.
                for _ in range(10):
                    engine.infer({"input": x})
                dynamic_ms = _p50_ms(lambda: engine.infer({"input": x}), arg)
                with engine.using_mode("static"):
                    engine.infer({"input": x})
                    static_ms = _p50_ms(lambda: engine.infer({"input": x}), arg)
                out.put({"seed": seed, "dynamic_ms": dynamic_ms, "static_ms": static_ms})
            elif cmd == "stop":
                break
    finally:
        engine.close()
        pool.close()
    out.put({"seed": seed, "closed": True})


# --- the test --------------------------------------------------------------------------------


@pytest.fixture
def pool_dir():
    # Short path under /dev/shm: AF_UNIX socket paths are limited to 107 bytes.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="ebbe", dir=base) as d:
        yield Path(d)


class _Nvml:
    """Device-wide ``used`` of GPU 0, as the coordinator reads it."""

    def __init__(self) -> None:
        import pynvml

        from engine_runtime import _cuda

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(_cuda.device_uuid(0))

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def wait_until(self, condition, what: str) -> int:
        deadline = time.monotonic() + WAIT_S
        while True:
            used = self.used()
            if condition(used):
                return used
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: NVML used {used / MiB:.0f} MiB after {WAIT_S:.0f} s")
            time.sleep(0.02)


def _gather(out, n: int, key: str) -> list[dict]:
    got = [out.get(timeout=WAIT_S) for _ in range(n)]
    missing = [g for g in got if key not in g]
    assert not missing, f"expected {key!r} from every replica, got {got}"
    return sorted(got, key=lambda g: g["seed"])


def test_two_engines_share_one_pool_and_the_card_holds_only_the_pool(pool_dir):
    from engine_runtime.memory.pool import connect_or_start

    nvml = _Nvml()
    pool = connect_or_start(0, chunk_bytes=CHUNK_BYTES, initial_chunks=0, directory=pool_dir, idle_exit_s=30.0)
    commands = [SPAWN.Queue() for _ in range(2)]
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_replica, args=(str(pool.socket_path), seed, commands[seed], out))
             for seed in range(2)]
    for p in procs:
        p.start()
    try:
        ready = _gather(out, 2, "context_bytes")
        assert all(r["mechanism"] == "vmm-pool" for r in ready), ready
        # One call's worth of chunks: the two engines take turns on the same memory.
        one_call = max(math.ceil(r["context_bytes"] / CHUNK_BYTES) for r in ready)
        pool.resize(one_call)
        pool_bytes = one_call * CHUNK_BYTES
        contexts_sum = sum(r["context_bytes"] for r in ready)
        print(f"\ncontexts {[round(r['context_bytes'] / MiB) for r in ready]} MiB; pool {pool_bytes / MiB:.0f} MiB "
              f"({one_call} x {CHUNK_BYTES / MiB:.0f} MiB)")

        # Outputs equal to eager, both replicas calling at once over the shared chunks.
        for q in commands:
            q.put(("check", None))
        for r in _gather(out, 2, "max_abs_diff"):
            assert r["max_abs_diff"] <= 1e-3 * max(r["scale"], 1.0), r
            print(f"replica {r['seed']}: bit-identical to eager: {r['identical']}, max |diff| {r['max_abs_diff']:.2e}")

        # The card's context memory is the pool: shrink it to nothing, read the floor,
        # grow it back, then call from both replicas at once and read the peak.
        for q in commands:  # every replica has leased (and so imported) chunks by now
            q.put(("calls", 2))
        _gather(out, 2, "done")
        held = nvml.used()
        pool.resize(0)  # idle: every chunk retires; replicas' watchers drop their imports
        floor = nvml.wait_until(lambda u: u <= held - pool_bytes + SLACK_BYTES, "pool memory back to the driver")
        pool.resize(one_call)
        for q in commands:
            q.put(("calls", 2))  # the new chunks are fetched and imported on these leases
        _gather(out, 2, "done")
        idle = nvml.used()
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], nvml.used())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for q in commands:
            q.put(("calls", CALLS))
        _gather(out, 2, "done")
        stop.set()
        sampler.join()
        print(f"NVML used: floor {floor / MiB:.0f} MiB, pool idle +{(idle - floor) / MiB:.0f} MiB, "
              f"both calling +{(peak[0] - floor) / MiB:.0f} MiB; pool {pool_bytes / MiB:.0f} MiB, "
              f"sum of contexts {contexts_sum / MiB:.0f} MiB")
        assert abs((idle - floor) - pool_bytes) <= SLACK_BYTES, "idle context memory is not the pool's size"
        assert peak[0] - floor <= pool_bytes + SLACK_BYTES, "calls took context memory beyond the pool"
        assert contexts_sum > pool_bytes + SLACK_BYTES  # without the pool the card would hold more

        # Latency, one replica alone: dynamic through the pool vs static vs static eager.
        pool.resize(2 * one_call)  # room for replica 0's standing lease in static mode
        commands[0].put(("p50", CALLS))
        r = _gather(out, 1, "dynamic_ms")[0]
        print(f"{ARCH} b{BATCH} p50: dynamic (pool) {r['dynamic_ms']:.2f} ms, static (graph) {r['static_ms']:.2f} ms, "
              f"static eager {ready[0]['eager_ms']:.2f} ms")
    finally:
        for q in commands:
            q.put(("stop", None))
        for p in procs:
            p.join(WAIT_S)
            if p.is_alive():
                p.kill()
        pool.shutdown_owner()
        pool.close()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
