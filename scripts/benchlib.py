"""Shared pieces of the Serve-level benchmarks (density, pressure).

A load generator over deployment handles (open loop, fixed rate), an NVML sampler,
a "ballast" process that takes GPU memory like another application would, the plain
Ray Serve baseline deployment (eager PyTorch, what users run today), and table/plot
output. Imported by ``scripts/bench_*.py``; not part of Ebb itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from engine_runtime.units import MiB, GiB

ROOT = Path(__file__).resolve().parents[1]


# -- results ------------------------------------------------------------------------


@dataclass
class CallResult:
    start_s: float
    latency_s: float
    outcome: str  # ok | oom | unavailable | died | error
    detail: str = ""


def classify(exc: BaseException) -> tuple[str, str]:
    """``(kind, message)``. The message is the replica's own exception where Ray wrapped
    it (``RayTaskError.cause``): Ray's wrapper text starts with the actor's repr, and a
    cut at 200 characters once kept only that, losing the numbers Ebb's errors carry."""
    inner = getattr(exc, "cause", None)
    inner = inner if isinstance(inner, BaseException) else exc
    text = f"{type(inner).__name__}: {inner}"[:600]
    low = f"{type(exc).__name__}: {exc} {text}".lower()
    if "contextmemoryunavailable" in low or "context memory unavailable" in low:
        return "unavailable", text
    if "out of memory" in low or "cuda_error_out_of_memory" in low or "outofmemory" in low:
        return "oom", text
    if "actordied" in low or "actorunavailable" in low or "rayactorerror" in low:
        return "died", text
    return "error", text


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q * 100))


def summarize(results: list[CallResult]) -> dict:
    ok = [r.latency_s for r in results if r.outcome == "ok"]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return {"sent": len(results), "outcomes": counts, "p50_ms": percentile(ok, 0.5) * 1e3,
            "p99_ms": percentile(ok, 0.99) * 1e3}


# -- load -------------------------------------------------------------------------


async def _one(handle, inputs: dict, t0: float, results: list[CallResult], timeout_s: float) -> None:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(handle.infer.remote(inputs), timeout=timeout_s)
        results.append(CallResult(start - t0, time.perf_counter() - start, "ok"))
    except Exception as exc:  # noqa: BLE001 - every failure is a measured outcome
        outcome, detail = classify(exc)
        results.append(CallResult(start - t0, time.perf_counter() - start, outcome, detail))


async def _drive(handles: list, inputs: dict, rate_per_s: float, duration_s: float, timeout_s: float,
                 t0: float) -> list[CallResult]:
    results: list[CallResult] = []
    tasks = []
    n = int(rate_per_s * duration_s)
    begin = time.perf_counter()
    for i in range(n):
        delay = begin + i / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(handles[i % len(handles)], inputs, t0, results, timeout_s)))
    await asyncio.gather(*tasks)
    return results


def drive(handles: list, inputs: dict, rate_per_s: float, duration_s: float, timeout_s: float = 60.0,
          t0: float | None = None) -> list[CallResult]:
    """Open-loop load: ``rate_per_s`` calls a second for ``duration_s``, round-robin over handles."""
    return asyncio.run(_drive(handles, inputs, rate_per_s, duration_s, timeout_s,
                              time.perf_counter() if t0 is None else t0))


# -- NVML ---------------------------------------------------------------------------


class NvmlSampler:
    """Samples card memory and per-process memory in a thread (no-op without NVML)."""

    def __init__(self, index: int = 0, period_s: float = 0.05) -> None:
        self.samples: list[dict] = []
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - no GPU: nothing to sample
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> dict:
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._h)
        procs = {p.pid: (p.usedGpuMemory or 0) for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._h)}
        return {"t": time.perf_counter(), "used": int(mem.used), "total": int(mem.total), "procs": procs}

    def start(self, t0: float) -> NvmlSampler:
        self._t0 = t0
        if self.available:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.read()
            s["t"] -= self._t0
            self.samples.append(s)
            self._stop.wait(self.period_s)

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.samples


# -- another application taking memory ----------------------------------------------


class Ballast:
    """A separate process that holds ``nbytes`` of GPU memory until released."""

    CODE = (
        "import sys, torch\n"
        "n = int(sys.argv[1])\n"
        "x = torch.empty(n, dtype=torch.uint8, device='cuda'); x.fill_(1); torch.cuda.synchronize()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.proc: subprocess.Popen | None = None

    def take(self, timeout_s: float = 60.0) -> float:
        """Start the process; return when it holds the memory (perf_counter time)."""
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.nbytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "held" not in line:
            raise RuntimeError(f"ballast of {self.nbytes / GiB:.1f} GiB failed to allocate")
        return time.perf_counter()

    def release(self) -> float:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None
        return time.perf_counter()


# -- the plain Ray Serve baseline -----------------------------------------------------


def plain_deployment():
    """What users run today: eager PyTorch in a Serve replica, PyTorch's cache keeps all."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class PlainTorch:
        def __init__(self, arch: str, image_size: int = 224, seq_len: int = 128) -> None:
            import torch

            from engine_runtime.architectures import build

            self.torch = torch
            m = build(arch, image_size=image_size, seq_len=seq_len)
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.model = m.module.to(self.device)

        def infer(self, inputs: dict) -> dict:
            torch = self.torch
            x = next(iter(inputs.values()))
            with torch.inference_mode():
                out = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            return {"output": out.cpu().numpy()}

        def pid(self) -> int:
            return os.getpid()

    return PlainTorch


def start_ray(num_gpus_if_none: int = 1) -> None:
    import logging

    import ray

    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        gpus = 0
    ray.init(address="local", num_gpus=None if gpus else num_gpus_if_none, num_cpus=max(8, os.cpu_count() or 1),
             include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})


def write_json(out_dir: Path, name: str, data) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def card_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)"
    except Exception:  # noqa: BLE001
        return "cpu (no GPU)"


@dataclass
class Timeline:
    """Events with times relative to the run's start."""

    events: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, t0: float, what: str) -> float:
        t = time.perf_counter() - t0
        self.events.append((t, what))
        return t


class StatusPoller:
    """Polls the coordinator's status from a thread every ``period_s``: one row per
    replica and poll (time since ``t0``, the GPU's used and total bytes, the replica's
    mode and the mode asked of it), for the pressure benchmarks' timelines."""

    def __init__(self, coordinator, t0: float, period_s: float = 0.05) -> None:
        self.coordinator, self.t0, self.period_s = coordinator, t0, period_s
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StatusPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                st = ray.get(self.coordinator.status.remote(), timeout=5)
                t = time.perf_counter() - self.t0
                for gpu in st["gpus"]:
                    for r in gpu["replicas"]:
                        self.rows.append({"t": t, "gpu": gpu["gpu"], "used": gpu["used_bytes"],
                                          "total": gpu["total_bytes"], "replica": r["replica_id"],
                                          "mode": r["mode"], "desired": r["desired_mode"]})
            except Exception:  # noqa: BLE001 - a restarting coordinator is not a benchmark failure
                pass
            self._stop.wait(self.period_s)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.rows
