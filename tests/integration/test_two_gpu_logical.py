"""``scripts/bench_two_gpu.py --logical``: the two-GPU scenario on two logical GPUs.

One run of the benchmark (a subprocess, as CI runs every benchmark's smoke
configuration): it must print its per-card table and write its JSON and plot, and
the run must pass the checks ``tests/gpu/test_two_gpu.py`` makes on real cards
(those that need NVML excepted): pressure injected on the second logical GPU moves its
replicas to dynamic and back, the first GPU's stay static, 0 failed requests. Then
the checks are shown to catch a run that broke each property, the NVML identity
checks included, so that the GPU test cannot pass by checking nothing.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import two_gpu_scenario as scenario  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("two-gpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_two_gpu.py"), "--logical",
                           "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"bench_two_gpu.py --logical failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, out


@pytest.fixture
def result(run) -> dict:
    return json.loads((run[1] / "two-gpu-logical.json").read_text())


def test_prints_a_table_per_card_and_writes_json_and_plot(run, result):
    proc, out = run
    assert "| card | replicas |" in proc.stdout, proc.stdout[-2000:]
    for uuid in result["cards"]:
        assert f"| {uuid}" in proc.stdout
    assert (out / "two-gpu-logical.png").is_file()


def test_logical_run_passes_the_checks_of_the_gpu_test(result):
    assert result["virtual"] == [True, True]
    assert scenario.problems(result) == []
    # Not vacuous: traffic reached both models and the pressed GPU's replicas were sampled dynamic.
    assert {m for m, t in result["traffic"].items() if t["sent"]} == {"resnet18", "encoder"}
    assert all(any(m == "dynamic" for m, _, _ in runs)
               for runs in scenario.mode_segments(result["samples"], result["pressed"]).values())


def _first_sample_of(result: dict, uuid: str) -> dict:
    return next(s for s in result["samples"] if uuid in s["gpus"] and s["t"] >= result["t_pressure_on_s"])


def test_the_checks_catch_each_broken_property(result):
    card_a, card_b = result["cards"]

    moved = copy.deepcopy(result)
    rep = next(iter(_first_sample_of(moved, card_a)["gpus"][card_a]["replicas"].values()))
    rep["mode"] = "dynamic"
    assert any(f"{card_a} (no pressure) left static" in p for p in scenario.problems(moved))

    stuck = copy.deepcopy(result)
    for s in stuck["samples"]:
        for r in s["gpus"].get(card_b, {}).get("replicas", {}).values():
            r["mode"] = "static"
    assert any("expected static, dynamic, static" in p for p in scenario.problems(stuck))

    failed = copy.deepcopy(result)
    failed["traffic"]["encoder"]["failed"] += 1
    failed["failures"].append({"model": "encoder", "t_s": 1.0, "latency_s": 0.1, "ok": False,
                               "error": "ContextMemoryUnavailable: ..."})
    assert any("1 failed requests" in p for p in scenario.problems(failed))

    restarted = copy.deepcopy(result)
    restarted["final_replica_ids"][card_b] = ["someone-else"]
    assert any("replicas changed" in p for p in scenario.problems(restarted))


def test_the_nvml_identity_checks_catch_a_replica_on_the_wrong_card(result):
    """The real-card checks, fed a made-up NVML snapshot shaped as ``identity_snapshot`` makes it."""
    card_a, card_b = result["cards"]
    real = copy.deepcopy(result)
    real["config"]["logical"], real["virtual"] = False, [False, False]
    replicas = [{"replica_id": rid, "model": "m", "pid": 1000 + i, "reported_gpu": uuid, "nvml_cards": [uuid],
                 "pool": "in use", "nvml_bytes": 700 * scenario.MiB}
                for i, (uuid, rid) in enumerate((u, r) for u in (card_a, card_b) for r in result["replica_ids"][u])]
    real["identity"] = {"replicas": replicas, "pools": {
        uuid: {"pool_bytes": 64 * scenario.MiB, "table_exists": True,
               "owners": [{"pid": 2000 + k, "nvml_cards": [uuid], "nvml_bytes": 600 * scenario.MiB}]}
        for k, uuid in enumerate((card_a, card_b))}}
    real["ballast_nvml_cards"] = [card_b]
    assert scenario.problems(real) == []

    wrong = copy.deepcopy(real)
    wrong["identity"]["replicas"][0]["nvml_cards"] = [card_a, card_b]
    assert any("NVML sees it on" in p for p in scenario.problems(wrong))

    shared_owner = copy.deepcopy(real)
    shared_owner["identity"]["pools"][card_b]["owners"][0]["pid"] = 2000
    assert any("one owner process for two cards" in p for p in scenario.problems(shared_owner))

    empty_pool = copy.deepcopy(real)
    empty_pool["identity"]["pools"][card_a]["pool_bytes"] = 0
    assert any(f"pool of {card_a}: holds 0 bytes" in p for p in scenario.problems(empty_pool))

    off_pool = copy.deepcopy(real)
    off_pool["identity"]["replicas"][1]["pool"] = "unavailable: no CUDA device visible"
    assert any("is not on its GPU's pool" in p for p in scenario.problems(off_pool))

    ballast = copy.deepcopy(real)
    ballast["ballast_nvml_cards"] = [card_a, card_b]
    assert any("the ballast is on cards" in p for p in scenario.problems(ballast))


def stand_in_owner(*args: str) -> subprocess.Popen:
    """A process with a pool owner's arguments that lives until its stdin is closed.

    It is returned once it has said it is up: Popen returns as soon as the exec has
    begun, and until the exec is through, the child's /proc/<pid>/cmdline reads empty,
    so a scan right after Popen (as ``pool_owner_pids`` makes) can miss it."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()",
                             "engine_runtime.memory.pool", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    return proc


def stop_stand_ins(procs) -> None:
    for p in procs:
        p.stdin.close()
        p.wait(timeout=10)
        p.stdout.close()


def test_pool_owners_are_found_by_card_and_directory(tmp_path):
    """The GPU test finds each card's pool owner by its command line; a stand-in process
    with an owner's arguments (and one for another directory) shows it picks the right one."""
    args = ["--gpu-uuid", "GPU-fake-0001"]
    mine = stand_in_owner(*args, "--directory", str(tmp_path))
    other = stand_in_owner(*args, "--directory", str(tmp_path / "elsewhere"))
    try:
        assert scenario.pool_owner_pids("GPU-fake-0001", str(tmp_path)) == [mine.pid]
        assert scenario.pool_owner_pids("GPU-fake-0002", str(tmp_path)) == []
    finally:
        stop_stand_ins((mine, other))


# -- the real-card pieces, run against stand-ins for torch.cuda and NVML ----------------------

FAKE_TORCH = '''
"""A stand-in for the part of torch the ballast uses: one card of 100 GiB, 10 GiB taken by others."""
import os
GiB = 1 << 30
_total, _others, _held = 100 * GiB, 10 * GiB, []
class _Cuda:
    class OutOfMemoryError(RuntimeError):
        pass
    def init(self): pass
    def get_device_name(self, i): return "fake card " + os.environ.get("CUDA_VISIBLE_DEVICES", "?")
    def mem_get_info(self, i): return _total - _others - sum(_held), _total
    def synchronize(self): pass
    def empty_cache(self): pass
cuda = _Cuda()
uint8 = "uint8"
class _T:
    def __init__(self, n): self.n = n
    def numel(self): return self.n
    def __del__(self): _held.remove(self.n)
def empty(n, dtype=None, device=None):
    assert device == "cuda:0", device
    if n > _total - _others - sum(_held): raise cuda.OutOfMemoryError("fake OOM")
    _held.append(n)
    return _T(n)
'''


def test_the_ballast_fills_its_card_in_steps_keeps_a_floor_and_frees(tmp_path, monkeypatch):
    (tmp_path / "torch.py").write_text(FAKE_TORCH)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    ballast = scenario.GpuBallast("GPU-fake-second", min_free_bytes=2 * scenario.GiB)
    try:
        assert ballast.device == "fake card GPU-fake-second"  # it saw only the card it was given
        half = ballast.fill(0.5)
        assert half["error"] is None and abs(half["share"] - 0.5) < 0.001, half
        assert half["held_bytes"] == 40 * scenario.GiB  # 50% of 100 GiB, less the 10 GiB of others
        full = ballast.fill(0.96)
        assert full["error"] is None and abs(full["share"] - 0.96) < 0.001, full
        beyond = ballast.fill(0.999)  # would leave under 2 GiB free: stops there, says so
        assert beyond["error"] and "short" in beyond["error"], beyond
        assert abs(beyond["share"] - 0.98) < 0.001, beyond
        freed = ballast.free()
        assert freed["held_bytes"] == 0 and abs(freed["share"] - 0.10) < 0.001, freed
    finally:
        ballast.close()
    assert ballast.proc.returncode == 0


class _FakeNvml:
    """Two cards; pids per card as given."""

    def __init__(self, pids_by_uuid: dict[str, dict[int, int]]) -> None:
        self.pids = pids_by_uuid
        self.uuids = list(pids_by_uuid)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h].encode()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"total": 100 * scenario.GiB, "used": sum(self.pids[self.uuids[h]].values())})()

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [type("P", (), {"pid": p, "usedGpuMemory": n})() for p, n in self.pids[self.uuids[h]].items()]


def test_identity_snapshot_reads_where_nvml_sees_replicas_and_pool_owners(tmp_path, monkeypatch):
    a, b = "GPU-aaaa", "GPU-bbbb"
    monkeypatch.setenv("EBB_POOL_DIR", str(tmp_path))
    from engine_runtime.memory.pool import PoolPaths

    PoolPaths.for_gpu(a).table.write_bytes(b"")
    owners = {u: stand_in_owner("--gpu-uuid", u, "--directory", str(tmp_path)) for u in (a, b)}
    try:
        # Replica 11 is where it says (card a); replica 12 says card b but NVML has it on both.
        fake = _FakeNvml({a: {11: 700, 12: 600, owners[a].pid: 900}, b: {12: 600, owners[b].pid: 900}})
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        monkeypatch.setattr(scenario, "_nvml_ready", False)
        view = {a: {"pool_bytes": 64, "replicas": [{"replica_id": "r1", "model": "m", "pid": 11, "pool": "in use"}]},
                b: {"pool_bytes": 0, "replicas": [{"replica_id": "r2", "model": "m", "pid": 12, "pool": "in use"}]}}
        snap = scenario.identity_snapshot(view)
    finally:
        stop_stand_ins(owners.values())
    by_id = {r["replica_id"]: r for r in snap["replicas"]}
    assert by_id["r1"]["nvml_cards"] == [a] and by_id["r1"]["nvml_bytes"] == 700
    assert by_id["r2"]["nvml_cards"] == [a, b]
    assert snap["pools"][a] == {"pool_bytes": 64, "table_exists": True,
                                "owners": [{"pid": owners[a].pid, "nvml_cards": [a], "nvml_bytes": 900}]}
    assert snap["pools"][b]["table_exists"] is False and snap["pools"][b]["owners"][0]["nvml_cards"] == [b]
