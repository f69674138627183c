"""Two GPUs of one host, pressure on the second only: the scenario behind
``tests/gpu/test_two_gpu.py`` (which asserts) and ``scripts/bench_two_gpu.py`` (which
reports), one implementation so that the benchmark's figures are the test's.

Replicas of two models at ``num_gpus: 0.5`` (2 models x 2 replicas: Ray can only place
them by using both cards), the context pool on, every replica ``pin: auto`` and
static. A client loop calls both models through their handles throughout. Another
process fills only the second card in steps (on logical GPUs, where no process can
take memory, the coordinator's ``inject_external_bytes`` on the second one stands in),
holds, frees. The coordinator's view is sampled from ``/ebb/status`` over HTTP, as an
operator would read it. On real cards NVML says which processes live on which card.

``run()`` returns plain JSON-able data; ``problems()`` lists what the run got wrong
(empty: the scenario passed). Not part of Ebb itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
GiB = 2**30

#: Set in every process the scenario starts (Ray's workers through the runtime env,
#: the ballast through its environment). Nothing here uses NCCL or symmetric memory;
#: the H200 x2 machine's notes ask that NVLink multicast stay off regardless.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

HTTP_PORTS = range(18500, 18600)
APP_NAME = "twogpu"
STATIC, DYNAMIC = "static", "dynamic"


@dataclass
class ScenarioConfig:
    """One run's knobs; ``gpu()`` and ``logical()`` give the two standard sizes."""

    logical: bool
    image_size: int = 224
    seq_len: int = 128
    max_batch: int = 8
    replicas_per_model: int = 2
    num_gpus: float = 0.5
    #: Card shares the ballast brings the second card to, one step at a time.
    fill_steps: tuple[float, ...] = (0.5, 0.8, 0.96)
    step_s: float = 1.5
    baseline_s: float = 5.0
    hold_s: float = 6.0
    tail_s: float = 3.0
    clients_per_model: int = 3
    poll_interval_s: float = 0.5
    min_dwell_s: float = 2.0
    sample_period_s: float = 0.2
    #: Deadlines of the waits (startup; each card's switch).
    ready_timeout_s: float = 300.0
    switch_timeout_s: float = 30.0
    virtual_gpu_memory_bytes: int = 512 * MiB
    pool_chunk_bytes: int = 32 * MiB
    #: The ballast never leaves less than this free on its card.
    ballast_min_free_bytes: int = 2 * GiB

    @classmethod
    def gpu(cls, **overrides: Any) -> ScenarioConfig:
        return cls(logical=False, **overrides)

    @classmethod
    def logical_cpu(cls, **overrides: Any) -> ScenarioConfig:
        """Sized for two CPU cores: small inputs, short phases, faster polls."""
        values = dict(logical=True, image_size=32, seq_len=16, max_batch=4, baseline_s=2.0, hold_s=3.0,
                      tail_s=1.5, step_s=0.8, clients_per_model=1, poll_interval_s=0.2, min_dwell_s=0.5,
                      ready_timeout_s=180.0, switch_timeout_s=20.0)
        values.update(overrides)
        return cls(**values)


def app_args(cfg: ScenarioConfig) -> dict[str, Any]:
    common = {"backend": "pytorch", "mode": STATIC, "pin": "auto", "lazy": False,
              "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.002}}
    return {
        "models": [
            {"name": "resnet18", "source": {"architecture": "resnet18", "seed": 0},
             "input": {"min_batch": 1, "opt_batch": cfg.max_batch, "max_batch": cfg.max_batch,
                       "image_size": cfg.image_size}, **common},
            {"name": "encoder", "source": {"architecture": "bert-tiny", "seed": 0},
             "input": {"min_batch": 1, "opt_batch": cfg.max_batch, "max_batch": cfg.max_batch,
                       "seq_len": cfg.seq_len}, **common},
        ],
        "coordinator": {"poll_interval_s": cfg.poll_interval_s, "min_dwell_s": cfg.min_dwell_s,
                        "admission_deadline_s": 10.0, "virtual_gpu_memory_bytes": cfg.virtual_gpu_memory_bytes},
        "context_pool": {"enabled": True, "chunk_bytes": cfg.pool_chunk_bytes},
    }


def model_inputs(cfg: ScenarioConfig) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {"resnet18": {"input": rng.standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)},
            "encoder": {"input_ids": rng.integers(0, 1000, (2, cfg.seq_len), dtype=np.int64)}}


def free_port(candidates: range) -> int:
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {candidates}")


class DeadlinePassed(TimeoutError):
    """A condition of the scenario did not hold by its deadline (what, and what was seen last)."""


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``condition`` until truthy and return that; raise :class:`DeadlinePassed` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            result = condition()
            if result:
                return result
            last = result
        except Exception as err:  # noqa: BLE001 - a condition not met yet; reported at the deadline
            last = err
        if time.monotonic() > deadline:
            raise DeadlinePassed(f"{what}: not within {timeout_s:.0f} s; last saw {last!r}"[:3000])
        time.sleep(interval_s)


# -- NVML: which process is on which card -------------------------------------------------


_nvml_lock = threading.Lock()
_nvml_ready = False


def nvml_cards() -> dict[str, dict[str, Any]]:
    """Every card NVML sees: UUID -> index, total and used bytes, pids with their bytes.

    NVML is initialised once per process and never shut down here: the sampler thread
    and the identity check read it at the same time."""
    global _nvml_ready
    import pynvml

    with _nvml_lock:
        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            raw = pynvml.nvmlDeviceGetUUID(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            procs = {int(p.pid): int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
            out[raw.decode() if isinstance(raw, bytes) else str(raw)] = {
                "index": i, "total_bytes": int(mem.total), "used_bytes": int(mem.used), "pids": procs}
        return out


def pool_owner_pids(gpu_uuid: str, directory: str) -> list[int]:
    """Pids of the pool owners (``python -m engine_runtime.memory.pool``) for this card and
    pool directory, found by their command lines."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if "engine_runtime.memory.pool" not in argv or "--gpu-uuid" not in argv:
            continue
        uuid = argv[argv.index("--gpu-uuid") + 1] if argv.index("--gpu-uuid") + 1 < len(argv) else None
        where = argv[argv.index("--directory") + 1] if "--directory" in argv else None
        if uuid == gpu_uuid and (where is None or os.path.realpath(where) == os.path.realpath(directory)):
            pids.append(int(entry.name))
    return sorted(pids)


# -- the other process ---------------------------------------------------------------------

BALLAST_CODE = r"""
import json, sys, torch
# This process sees one card only (CUDA_VISIBLE_DEVICES): cuda:0 here is the card under pressure.
held, piece = [], 1 << 30
min_free = int(sys.argv[1])
torch.cuda.init()
print(json.dumps({"ready": True, "device": torch.cuda.get_device_name(0)}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "fill":
        free, total = torch.cuda.mem_get_info(0)
        want = int(cmd["share"] * total) - (total - free)
        error = None
        while want > 0:
            free, total = torch.cuda.mem_get_info(0)
            n = min(piece, want, free - min_free) // (2 << 20) * (2 << 20)
            if n <= 0:
                error = f"stopped {want >> 20} MiB short: {free >> 20} MiB free, keeping {min_free >> 20} MiB"
                break
            try:
                held.append(torch.empty(n, dtype=torch.uint8, device="cuda:0"))
            except torch.cuda.OutOfMemoryError as err:
                error = f"out of memory with {want >> 20} MiB to go: {err}"[:300]
                break
            want -= n
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(0)
        print(json.dumps({"held_bytes": sum(t.numel() for t in held), "share": (total - free) / total,
                          "error": error}), flush=True)
    elif cmd["op"] == "free":
        held.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(0)
        print(json.dumps({"held_bytes": 0, "share": (total - free) / total, "error": None}), flush=True)
"""


class GpuBallast:
    """A separate process holding memory on one card only (``CUDA_VISIBLE_DEVICES`` = its UUID)."""

    def __init__(self, gpu_uuid: str, min_free_bytes: int) -> None:
        env = {**os.environ, **NO_MULTICAST_ENV, "CUDA_VISIBLE_DEVICES": gpu_uuid}
        self.proc = subprocess.Popen([sys.executable, "-c", BALLAST_CODE, str(min_free_bytes)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._answer()
        self.device = hello.get("device")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the ballast process exited (rc {self.proc.poll()})")
        return json.loads(line)

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def fill(self, share: float) -> dict:
        return self._ask({"op": "fill", "share": share})

    def free(self) -> dict:
        return self._ask({"op": "free"})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LogicalPressure:
    """The ballast's stand-in on a logical GPU: bytes "another process" holds, set on the coordinator."""

    def __init__(self, coordinator, gpu_uuid: str, read_gpu) -> None:
        self.coordinator, self.gpu_uuid, self.read_gpu = coordinator, gpu_uuid, read_gpu
        self.pid = None

    def _set(self, nbytes: int) -> dict:
        import ray

        # By keyword: a driver handle may carry Ray's stand-in signature (**kwargs only).
        ray.get(self.coordinator.inject_external_bytes.remote(gpu_uuid=self.gpu_uuid, nbytes=int(nbytes)), timeout=10)
        g = wait_until(lambda: (v := self.read_gpu()) and v["external_bytes"] == int(nbytes) and v, 10.0,
                       f"the coordinator to show {nbytes} external bytes on {self.gpu_uuid}")
        return {"held_bytes": int(nbytes), "share": g["used_bytes"] / g["total_bytes"], "error": None}

    def fill(self, share: float) -> dict:
        g = self.read_gpu()
        base = g["used_bytes"] - g["external_bytes"]
        return self._set(max(0, int(share * g["total_bytes"]) - base))

    def free(self) -> dict:
        return self._set(0)

    def close(self) -> None:
        pass


# -- traffic ---------------------------------------------------------------------------------


@dataclass
class Call:
    model: str
    t_s: float
    latency_s: float
    ok: bool
    error: str = ""


class Traffic:
    """``clients`` threads per model, each calling its model back to back through a handle.

    Every answer is compared with the model's first one (replicas on both cards, static
    and dynamic, must agree): a wrong answer counts as a failed request."""

    def __init__(self, handles: dict, inputs: dict, clients: int, t0: float) -> None:
        self.handles, self.inputs, self.t0 = handles, inputs, t0
        self.calls: list[Call] = []
        self._reference: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(m,), daemon=True, name=f"client-{m}-{i}")
                         for m in handles for i in range(clients)]

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def _check(self, model: str, out: np.ndarray) -> str:
        with self._lock:
            ref = self._reference.setdefault(model, out)
        if out.shape != ref.shape or not np.all(np.isfinite(out)):
            return f"wrong answer: shape {out.shape} (expected {ref.shape}) or non-finite values"
        # Loose enough for TF32 convolutions and another batch bucket, tight enough for garbage.
        err = float(np.max(np.abs(out - ref)))
        bound = 1e-2 * float(np.max(np.abs(ref))) + 1e-3
        return "" if err <= bound else f"wrong answer: max abs difference {err:.3g} > {bound:.3g}"

    def _loop(self, model: str) -> None:
        handle, inputs = self.handles[model], self.inputs[model]
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                out = handle.infer.remote(inputs).result(timeout_s=60)["output"]
                error = self._check(model, np.asarray(out))
            except Exception as exc:  # noqa: BLE001 - every failure is a measured outcome
                error = f"{type(exc).__name__}: {exc}"[:300]
            call = Call(model, start - self.t0, time.perf_counter() - start, not error, error)
            with self._lock:
                self.calls.append(call)

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)
        return list(self.calls)


# -- sampling /ebb/status -------------------------------------------------------------------


class StatusSampler:
    """Reads ``/ebb/status`` every ``period_s`` (and NVML's per-card use on real cards)."""

    def __init__(self, url: str, t0: float, period_s: float, cards: list[str], nvml: bool) -> None:
        self.url, self.t0, self.period_s, self.cards, self.nvml = url, t0, period_s, cards, nvml
        self.samples: list[dict] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="status-sampler")

    def start(self) -> StatusSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        import requests

        while not self._stop.is_set():
            try:
                st = requests.get(f"{self.url}/ebb/status", timeout=5).json()
                sample = {"t": time.perf_counter() - self.t0, "gpus": {}}
                for g in st["gpus"]:
                    if g["gpu"] in self.cards:
                        sample["gpus"][g["gpu"]] = {
                            "used_bytes": g["used_bytes"], "total_bytes": g["total_bytes"],
                            "pool_bytes": g["pool_bytes"], "external_bytes": g["external_bytes"],
                            "replicas": {r["replica_id"]: {"model": r["model"], "mode": r["mode"],
                                                           "desired_mode": r["desired_mode"], "pid": r["pid"]}
                                         for r in g["replicas"]}}
                if self.nvml:
                    cards = nvml_cards()
                    sample["nvml_used_bytes"] = {u: cards[u]["used_bytes"] for u in self.cards if u in cards}
                self.samples.append(sample)
            except Exception:  # noqa: BLE001 - a missed sample is counted, not fatal
                self.errors += 1
            self._stop.wait(self.period_s)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.samples


# -- the run ----------------------------------------------------------------------------------


def _modes(gpu_view: dict) -> dict[str, str]:
    return {r["replica_id"]: r["mode"] for r in gpu_view["replicas"]}


def _all_in(gpu_view: dict | None, mode: str) -> bool:
    return bool(gpu_view and gpu_view["replicas"]
                and all(r["mode"] == mode and r["desired_mode"] == mode for r in gpu_view["replicas"]))


def start_cluster(cfg: ScenarioConfig) -> None:
    import ray

    if ray.is_initialized():
        logging.getLogger(__name__).warning("Ray was left initialised (an earlier test?); shutting it down")
        ray.shutdown()
    os.environ.update(NO_MULTICAST_ENV)
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                **NO_MULTICAST_ENV}
    ray.init(address="local", num_cpus=4 if cfg.logical else max(8, min(16, os.cpu_count() or 8)), num_gpus=2,
             include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": env_vars})


def stop_cluster(node_id: str | None) -> None:
    import glob

    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
    if node_id:
        # Logical GPUs' admission budgets are files named after this node; the node is gone.
        for path in glob.glob(f"/dev/shm/ebb-budget-*{node_id[:12]}*"):
            os.unlink(path)


def identity_snapshot(view: dict[str, dict]) -> dict[str, Any]:
    """Where NVML sees each replica process and each card's pool owner (real cards only)."""
    from engine_runtime.memory.pool import PoolPaths, default_directory

    cards = nvml_cards()
    # Every card NVML sees, not only the two under test: a process on a third would be wrong too.
    on = {pid: sorted(u for u in cards if pid in cards[u]["pids"]) for c in cards.values() for pid in c["pids"]}
    replicas = [{"replica_id": r["replica_id"], "model": r["model"], "pid": r["pid"], "reported_gpu": uuid,
                 "nvml_cards": on.get(r["pid"], []), "pool": r["pool"],
                 "nvml_bytes": cards[uuid]["pids"].get(r["pid"])}
                for uuid, g in view.items() for r in g["replicas"]]
    directory = str(default_directory())
    pools = {}
    for uuid, g in view.items():
        owners = pool_owner_pids(uuid, directory)
        pools[uuid] = {"pool_bytes": g["pool_bytes"], "table_exists": PoolPaths.for_gpu(uuid).table.exists(),
                       "owners": [{"pid": p, "nvml_cards": on.get(p, []), "nvml_bytes": cards[uuid]["pids"].get(p)}
                                  for p in owners]}
    return {"replicas": replicas, "pools": pools}


def run(cfg: ScenarioConfig, *, strict: bool) -> dict[str, Any]:
    """The whole scenario on a cluster this function starts and stops.

    ``strict``: a wait that passes its deadline raises :class:`DeadlinePassed` (the test);
    otherwise it is recorded as not reached and the run goes on (the benchmark).
    """
    import ray
    import requests
    from ray import serve

    from deployments.app import bind
    from deployments.config import parse_app_config
    from deployments.coordinator import get_existing

    app = parse_app_config(app_args(cfg))
    opts = {m.name: {"num_replicas": cfg.replicas_per_model, "max_ongoing_requests": 16,
                     "ray_actor_options": {"num_gpus": cfg.num_gpus, "num_cpus": 0.25 if cfg.logical else 0.5}}
            for m in app.models}
    nreplicas = cfg.replicas_per_model * len(app.models)
    result: dict[str, Any] = {"config": asdict(cfg), "events": [], "not_reached": []}
    start_cluster(cfg)
    node_id = ray.get_runtime_context().get_node_id() if cfg.logical else None
    pressure = traffic = sampler = None
    try:
        port = free_port(HTTP_PORTS)
        url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bind(app, opts), name=APP_NAME, route_prefix="/")
        coordinator = wait_until(lambda: get_existing(app.coordinator.namespace), 60, "the coordinator actor")

        def view() -> dict[str, dict]:
            st = requests.get(f"{url}/ebb/status", timeout=5).json()
            return {g["gpu"]: g for g in st["gpus"] if g["replicas"]}

        def placed() -> dict[str, dict] | None:
            v = view()
            reps = [r for g in v.values() for r in g["replicas"]]
            ok = (len(v) == 2 and len(reps) == nreplicas and all(r["loaded"] for r in reps)
                  and all(_all_in(g, STATIC) for g in v.values()))
            return v if ok else None

        first = wait_until(placed, cfg.ready_timeout_s, f"{nreplicas} loaded static replicas on 2 GPUs")
        if cfg.logical:
            cards = sorted(first, key=lambda u: int(u.rsplit("-", 1)[1]))
        else:
            nvml = nvml_cards()
            cards = sorted(first, key=lambda u: nvml[u]["index"] if u in nvml else 1 << 30)
        card_b = cards[1]  # the second card by NVML index (logical: by Ray's GPU id) is pressed
        result.update(cards=cards, pressed=card_b, virtual=[first[u]["virtual"] for u in cards],
                      placement={u: sorted(f"{r['model']}:{r['replica_id']}" for r in first[u]["replicas"])
                                 for u in cards},
                      replica_ids={u: sorted(r["replica_id"] for r in first[u]["replicas"]) for u in cards})

        def gpu(uuid: str) -> dict | None:
            return view().get(uuid)

        def wait(condition, what: str) -> float | None:
            try:
                wait_until(condition, cfg.switch_timeout_s, what)
            except DeadlinePassed as err:
                if strict:
                    raise
                result["not_reached"].append(str(err))
                return None
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        handles = {m.name: serve.get_deployment_handle(m.name, app_name=APP_NAME) for m in app.models}
        sampler = StatusSampler(url, t0, cfg.sample_period_s, cards, nvml=not cfg.logical).start()
        traffic = Traffic(handles, model_inputs(cfg), cfg.clients_per_model, t0).start()

        def event(what: str, **data: Any) -> None:
            result["events"].append({"t": time.perf_counter() - t0, "what": what, **data})

        event("traffic on")
        time.sleep(cfg.baseline_s)  # pacing: steady traffic before any pressure
        if not cfg.logical:
            # NVML's process list and the pool's size are read at slightly different
            # moments: wait (with a deadline) for a snapshot in which every check holds.
            snap: dict[str, Any] = {}

            def consistent() -> bool:
                snap.clear()
                snap.update(identity_snapshot(view()))
                return not identity_problems(snap)

            try:
                wait_until(consistent, cfg.switch_timeout_s, "NVML to show each replica and pool owner on its card")
            except DeadlinePassed as err:
                if strict:
                    raise DeadlinePassed(f"{err}; problems: {identity_problems(snap)}") from None
                result["not_reached"].append(str(err))
            result["identity"] = snap
        if cfg.logical:
            pressure = LogicalPressure(coordinator, card_b, lambda: gpu(card_b))
        else:
            pressure = GpuBallast(card_b, cfg.ballast_min_free_bytes)
            result["ballast_device"] = pressure.device
        for share in cfg.fill_steps:
            answer = pressure.fill(share)
            event("fill", target_share=share, **answer)
            if pressure.pid is not None and "ballast_nvml_cards" not in result:
                cards_now = nvml_cards()
                result["ballast_nvml_cards"] = sorted(u for u in cards if pressure.pid in cards_now[u]["pids"])
            time.sleep(cfg.step_s)  # pacing: each step is held a few polls
        result["t_pressure_on_s"] = result["events"][-1]["t"]
        result["t_dynamic_s"] = wait(lambda: _all_in(gpu(card_b), DYNAMIC), f"every replica on {card_b} dynamic")
        time.sleep(cfg.hold_s)  # pacing: hold the pressure while traffic runs
        answer = pressure.free()
        event("free", **answer)
        result["t_pressure_off_s"] = result["events"][-1]["t"]
        result["t_static_s"] = wait(lambda: _all_in(gpu(card_b), STATIC), f"every replica on {card_b} static again")
        time.sleep(cfg.tail_s)  # pacing: traffic after the return
        event("traffic off")
        calls = traffic.stop()
        traffic = None
        result["samples"] = sampler.stop()
        result["sample_errors"] = sampler.errors
        sampler = None
        st = ray.get(coordinator.status.remote(), timeout=30)
        result["history"] = [h for h in st["history"] if h["gpu"] in cards]
        last = {g["gpu"]: g for g in st["gpus"] if g["replicas"]}
        result["final_replica_ids"] = {u: sorted(r["replica_id"] for r in last.get(u, {"replicas": []})["replicas"])
                                       for u in cards}
        result["traffic"] = traffic_summary(calls, result["t_pressure_on_s"], result["t_pressure_off_s"])
        # Every failure is kept (a real-card run makes tens of thousands of calls: not those).
        result["failures"] = [asdict(c) for c in calls if not c.ok]
        return result
    finally:
        if traffic is not None:
            traffic.stop()
        if sampler is not None:
            sampler.stop()
        if pressure is not None:
            pressure.close()
        stop_cluster(node_id)


# -- judging a run ----------------------------------------------------------------------------


def mode_segments(samples: list[dict], uuid: str) -> dict[str, list[tuple[str, float, float]]]:
    """Per replica of ``uuid``: (mode, first seen s, last seen s) runs, in order."""
    out: dict[str, list[list]] = {}
    for s in samples:
        for rid, r in s["gpus"].get(uuid, {}).get("replicas", {}).items():
            runs = out.setdefault(rid, [])
            if runs and runs[-1][0] == r["mode"]:
                runs[-1][2] = s["t"]
            else:
                runs.append([r["mode"], s["t"], s["t"]])
    return {rid: [tuple(x) for x in runs] for rid, runs in out.items()}


def first_sample_all(result: dict, uuid: str, mode: str, after_s: float) -> float | None:
    """Time of the first status sample after ``after_s`` with every replica of ``uuid`` in ``mode``."""
    for s in result["samples"]:
        reps = s["gpus"].get(uuid, {}).get("replicas", {})
        if s["t"] >= after_s and reps and all(r["mode"] == mode for r in reps.values()):
            return s["t"]
    return None


def traffic_summary(calls: list[Call], on_s: float, off_s: float) -> dict[str, dict]:
    """Per model: calls sent, failed, sent while the pressure was on, latency p50/p99."""
    out = {}
    for model in sorted({c.model for c in calls}):
        mine = [c for c in calls if c.model == model]
        ok = [c.latency_s for c in mine if c.ok]
        out[model] = {"sent": len(mine), "failed": sum(1 for c in mine if not c.ok),
                      "during_pressure": sum(1 for c in mine if on_s <= c.t_s <= off_s),
                      "p50_ms": float(np.percentile(ok, 50) * 1e3) if ok else None,
                      "p99_ms": float(np.percentile(ok, 99) * 1e3) if ok else None}
    return out


def failed_calls(result: dict) -> list[dict]:
    return result["failures"]


def calls_sent(result: dict, models: list[str] | None = None) -> int:
    return sum(t["sent"] for m, t in result["traffic"].items() if models is None or m in models)


def models_on(result: dict, uuid: str) -> list[str]:
    return sorted({p.split(":", 1)[0] for p in result["placement"][uuid]})


def problems(result: dict) -> list[str]:
    """What the run got wrong; empty when every property of the scenario held."""
    out: list[str] = []
    cards, card_a, card_b = result["cards"], result["cards"][0], result["pressed"]
    logical = result["config"]["logical"]
    nreplicas = result["config"]["replicas_per_model"] * 2
    if len(set(cards)) != 2 or sum(len(v) for v in result["replica_ids"].values()) != nreplicas:
        out.append(f"placement: expected {nreplicas} replicas over 2 GPUs, got {result['placement']}")
    if any(result["virtual"]) != logical:
        out.append(f"GPUs virtual={result['virtual']} in a {'logical' if logical else 'real-card'} run")
    if result["final_replica_ids"] != result["replica_ids"]:
        out.append(f"replicas changed during the run: {result['replica_ids']} -> {result['final_replica_ids']}")
    out += [f"not reached: {x}" for x in result["not_reached"]]
    if result.get("t_dynamic_s") is None or result.get("t_static_s") is None:
        out.append(f"{card_b}: dynamic at {result.get('t_dynamic_s')} s, static again at {result.get('t_static_s')} s")
    # The unpressed card: every sample, every replica, static and told to stay static.
    seen_a = [(s["t"], rid, r["mode"], r["desired_mode"]) for s in result["samples"]
              for rid, r in s["gpus"].get(card_a, {}).get("replicas", {}).items()]
    moved = [x for x in seen_a if x[2] != STATIC or x[3] != STATIC]
    if moved:
        out.append(f"{card_a} (no pressure) left static: {moved[:5]}")
    on, off = result.get("t_pressure_on_s", 0), result.get("t_pressure_off_s", 0)
    if not any(on <= x[0] <= off for x in seen_a):
        out.append(f"{card_a}: no sample while the pressure was on ({on:.1f}-{off:.1f} s)")
    # The pressed card: samples show dynamic while pressed, and its decisions are exactly
    # one "dynamic" then one "static" per replica; none on the other card.
    segments = mode_segments(result["samples"], card_b)
    for rid in result["replica_ids"][card_b]:
        modes = [m for m, _, _ in segments.get(rid, [])]
        if modes != [STATIC, DYNAMIC, STATIC]:
            out.append(f"{card_b} replica {rid}: sampled modes {modes}, expected static, dynamic, static")
    decided = [(h["gpu"], h["replica_id"], h["new_mode"]) for h in result["history"]]
    if any(g == card_a for g, _, _ in decided):
        out.append(f"decisions on {card_a} (no pressure): {[d for d in decided if d[0] == card_a]}")
    for rid in result["replica_ids"][card_b]:
        mine = [m for g, r, m in decided if g == card_b and r == rid]
        if mine != [DYNAMIC, STATIC]:
            out.append(f"{card_b} replica {rid}: decisions {mine}, expected dynamic then static")
    # Traffic: both models answered throughout, nothing failed.
    failed = sum(t["failed"] for t in result["traffic"].values())
    if failed or result["failures"]:
        out.append(f"{failed} failed requests of {calls_sent(result)}: "
                   f"{[c['error'] for c in result['failures'][:5]]}")
    for model in ("resnet18", "encoder"):
        if not result["traffic"].get(model, {}).get("during_pressure"):
            out.append(f"no call to {model} while the pressure was on")
    fills = [e for e in result["events"] if e["what"] == "fill"]
    if fills and fills[-1]["share"] < 0.92:
        out.append(f"the pressure reached only {fills[-1]['share']:.1%} of {card_b}: {fills[-1]}")
    if not logical:
        out += _identity_problems(result)
    return out


def _identity_problems(result: dict) -> list[str]:
    ident = result.get("identity")
    out = identity_problems(ident) if ident else ["no NVML identity snapshot"]
    if result.get("ballast_nvml_cards") != [result["pressed"]]:
        out.append(f"the ballast is on cards {result.get('ballast_nvml_cards')}, expected only {result['pressed']}")
    return out


def identity_problems(ident: dict) -> list[str]:
    """What an ``identity_snapshot`` shows wrong: a replica or pool owner seen on another
    card than its own, a replica off its GPU's pool, a pool without chunks or owner."""
    out = []
    for r in ident["replicas"]:
        if r["nvml_cards"] != [r["reported_gpu"]]:
            out.append(f"replica {r['model']}:{r['replica_id']} pid {r['pid']} reports {r['reported_gpu']}, "
                       f"NVML sees it on {r['nvml_cards']}")
        if r["pool"] != "in use":
            out.append(f"replica {r['model']}:{r['replica_id']} is not on its GPU's pool: {r['pool']}")
    owners = []
    for uuid, p in ident["pools"].items():
        if not p["table_exists"]:
            out.append(f"pool of {uuid}: no lease table file")
        if not p["pool_bytes"]:
            out.append(f"pool of {uuid}: holds {p['pool_bytes']} bytes while its replicas are static")
        if len(p["owners"]) != 1:
            out.append(f"pool of {uuid}: owner processes {p['owners']}, expected one")
        for o in p["owners"]:
            owners.append(o["pid"])
            # A process with a context on that card alone can create memory nowhere else.
            if o["nvml_cards"] != [uuid]:
                out.append(f"pool owner of {uuid} (pid {o['pid']}) is on cards {o['nvml_cards']}")
    if len(set(owners)) != len(owners):
        out.append(f"one owner process for two cards' pools: {owners}")
    return out


def card_rows(result: dict) -> list[list]:
    """One table row per card: replicas, modes over time, pressure, failed requests."""
    rows = []
    for uuid in result["cards"]:
        segs = mode_segments(result["samples"], uuid)
        modes = "; ".join(f"{rid[-6:]}: " + ", ".join(f"{m} {a:.1f}-{b:.1f} s" for m, a, b in runs)
                          for rid, runs in sorted(segs.items()))
        models = models_on(result, uuid)
        shares = [s["gpus"][uuid]["used_bytes"] / s["gpus"][uuid]["total_bytes"] for s in result["samples"]
                  if uuid in s["gpus"] and s["gpus"][uuid]["total_bytes"]]
        failed = sum(t["failed"] for m, t in result["traffic"].items() if m in models)
        calls = calls_sent(result, models)
        rows.append([f"{uuid}{' (pressed)' if uuid == result['pressed'] else ''}",
                     ", ".join(f"{p.split(':')[0]}:{p.split(':')[1][-6:]}" for p in result["placement"][uuid]),
                     modes, f"{max(shares, default=0):.1%}", f"{failed} of {calls}"])
    return rows
