"""EngineGroup: weights tiers by bytes and last use, one context source, errors (CPU).

The group logic runs against ``TierEngine``, a small BaseEngine whose weights are one
number and whose page-in can be told to fail; the real PyTorch backend (CPU) checks
that outputs are bit-identical after its weights went to host memory and came back.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from engine_runtime import (
    ContextMemoryUnavailable,
    EngineGroup,
    GroupBudget,
    GroupConfigError,
    UnknownModelError,
    WeightsBudgetUnavailable,
    WeightsPageError,
    WeightsTier,
)
from engine_runtime.backends.pytorch import PyTorchEngine
from engine_runtime.engine import BaseEngine
from engine_runtime.group import GroupAdmission
from engine_runtime.memory import ContextMechanism, HostAccountingAllocator, MemoryMode
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec

MiB = 2**20
CONTEXT_PER_SAMPLE = 1000


class TierEngine(BaseEngine):
    """Weights are ``scale``: y = scale * x. Records loads and page moves in ``log``."""

    def __init__(self, name: str, nbytes: int, log: list, scale: float = 1.0, host: bool = True,
                 on_call=None, on_page=None) -> None:
        super().__init__(name, admission_deadline_s=30.0)
        self.nbytes, self.log, self.scale, self.host = nbytes, log, scale, host
        self.w: float | None = None
        self.saved: float | None = None
        self.fail_page_in = 0
        self.on_call = on_call
        #: Called as ``on_page(engine, "out" | "in")`` where a real backend copies its weights.
        self.on_page = on_page

    def _describe_impl(self) -> EngineDescription:
        return EngineDescription(self.name, (TensorSpec("x", "float32", (-1, 2)),),
                                 (TensorSpec("y", "float32", (-1, 2)),),
                                 {"x": ShapeProfile((1, 2), (1, 2), (4, 2))}, self.nbytes, "fake", "cpu")

    def _mechanism_impl(self) -> ContextMechanism:
        return ContextMechanism.HOST_ACCOUNTING

    def _context_bytes_impl(self, shapes) -> int:
        return shapes["x"][0] * CONTEXT_PER_SAMPLE

    def _load_impl(self) -> None:
        self.log.append(("load", self.name))
        self.w = self.scale

    def _execute_impl(self, inputs, shapes, mode):
        def run():
            if self.on_call is not None:
                self.on_call(self)
            assert self.w is not None, f"{self.name} ran without its weights"
            return {"y": np.asarray(inputs["x"]) * np.float32(self.w)}

        if mode is MemoryMode.DYNAMIC:
            with self.dynamic_context(self.context_bytes(shapes), HostAccountingAllocator().allocate):
                return run()
        return run()

    def _host_tier_supported(self) -> bool:
        return self.host

    def _page_out_impl(self) -> None:
        if self.on_page is not None:
            self.on_page(self, "out")
        self.log.append(("out", self.name))
        self.saved, self.w = self.w, None

    def _page_in_impl(self) -> None:
        if self.fail_page_in:
            self.fail_page_in -= 1
            raise RuntimeError("injected: no device memory")
        if self.on_page is not None:
            self.on_page(self, "in")
        self.log.append(("in", self.name))
        self.w, self.saved = self.saved, None

    def _close_impl(self) -> None:
        self.log.append(("close", self.name))
        self.w = None


X = np.ones((1, 2), np.float32)


def make_group(sizes: dict[str, int], budget: int | None, host_tier: bool = True, deadline_s: float = 30.0, **kw):
    log: list = []
    group = EngineGroup(GroupBudget(gpu_weights_budget_bytes=budget, host_tier=host_tier), deadline_s=deadline_s)
    for i, (name, n) in enumerate(sizes.items()):
        group.add(name, lambda name=name, n=n, i=i: TierEngine(name, n, log, scale=i + 1, **kw))
    return group, log


def tiers(group: EngineGroup) -> dict[str, str]:
    return {s.name: s.tier.value for s in group.status()}


def test_least_recently_used_goes_first_and_by_bytes():
    group, log = make_group({"a": 3 * MiB, "b": 3 * MiB, "c": 4 * MiB, "d": 6 * MiB}, budget=10 * MiB)
    for name in ("a", "b", "c"):
        group.infer(name, {"x": X})
    assert group.resident_weights_bytes() == 10 * MiB
    group.infer("a", {"x": X})  # b is now the least recently used
    log.clear()
    group.infer("d", {"x": X})
    # 6 MiB wanted with 0 free: b (3) is not enough, c (4) next; a, used last, stays.
    assert [e for e in log if e[0] == "out"] == [("out", "b"), ("out", "c")]
    assert tiers(group) == {"a": "gpu", "b": "host", "c": "host", "d": "gpu"}
    assert group.resident_weights_bytes() == 9 * MiB


def test_budget_is_respected_under_concurrent_calls():
    sizes = {f"m{i}": (2 + i % 3) * MiB for i in range(8)}
    peak = [0]
    group = None

    def watch(engine):
        peak[0] = max(peak[0], sum(s.weights_bytes for s in group.status() if s.tier is WeightsTier.GPU))

    group, _ = make_group(sizes, budget=8 * MiB, on_call=watch)
    errors = []

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                name = f"m{int(rng.integers(0, 8))}"
                y = group.infer(name, {"x": X})["y"]
                assert float(y[0, 0]) == float(name[1:]) + 1
                assert group.resident_weights_bytes() <= 8 * MiB
        except Exception as err:  # noqa: BLE001 - collected for the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 0 < peak[0] <= 8 * MiB
    status = {s.name: s for s in group.status()}
    assert sum(s.calls for s in status.values()) == 160
    assert sum(s.page_ins for s in status.values()) > 0


def test_host_tier_off_unloads_and_reloads():
    group, log = make_group({"a": 6 * MiB, "b": 6 * MiB}, budget=8 * MiB, host_tier=False)
    assert group.infer("a", {"x": X})["y"][0, 0] == 1
    assert group.infer("b", {"x": X})["y"][0, 0] == 2
    assert tiers(group) == {"a": "unloaded", "b": "gpu"}
    assert ("close", "a") in log and ("out", "a") not in log
    assert group.infer("a", {"x": X})["y"][0, 0] == 1
    assert log.count(("load", "a")) == 2
    assert {s.name: s.page_ins for s in group.status()}["a"] == 1


def test_unknown_model_lists_the_known_ones():
    group, _ = make_group({"alpha": MiB, "beta": MiB}, budget=None)
    with pytest.raises(UnknownModelError) as info:
        group.infer("gamma", {"x": X})
    assert isinstance(info.value, LookupError)
    assert "'gamma'" in str(info.value) and "alpha, beta" in str(info.value)
    assert info.value.known == ["alpha", "beta"]
    assert group.resident_weights_bytes() == 0  # nothing was loaded for it


def test_duplicate_and_oversized_models_are_refused():
    group, _ = make_group({"a": MiB}, budget=4 * MiB)
    with pytest.raises(GroupConfigError, match="already holds"):
        group.add("a", lambda: TierEngine("a", MiB, []))
    with pytest.raises(GroupConfigError, match="larger than"):
        group.add("big", lambda: TierEngine("big", 5 * MiB, []))
    assert group.names() == ["a"]


def test_close_is_idempotent_and_closes_every_engine():
    group, log = make_group({"a": MiB, "b": MiB}, budget=None)
    group.infer("a", {"x": X})
    group.close()
    group.close()
    assert log.count(("close", "a")) == 1
    assert group.engine("b").closed
    with pytest.raises(Exception, match="closed"):
        group.infer("a", {"x": X})


def test_failed_page_in_leaves_the_model_on_the_host_and_can_be_retried():
    group, _ = make_group({"a": 6 * MiB, "b": 6 * MiB}, budget=8 * MiB)
    group.infer("a", {"x": X})
    group.infer("b", {"x": X})
    group.engine("a").fail_page_in = 1
    with pytest.raises(WeightsPageError, match="injected"):
        group.infer("a", {"x": X})
    # b was paged out to make room; a is still on the host; the budget counts nothing moving.
    assert tiers(group) == {"a": "host", "b": "host"}
    assert group.resident_weights_bytes() == 0
    assert group.infer("a", {"x": X})["y"][0, 0] == 1
    assert tiers(group) == {"a": "gpu", "b": "host"}
    assert group.infer("b", {"x": X})["y"][0, 0] == 2


def test_an_engine_called_directly_pages_itself_in():
    group, _ = make_group({"a": 6 * MiB, "b": 6 * MiB}, budget=8 * MiB)
    group.infer("a", {"x": X})
    group.infer("b", {"x": X})
    engine = group.engine("a")
    assert engine.weights_tier is WeightsTier.HOST
    assert engine.infer({"x": X})["y"][0, 0] == 1  # never runs over weights that are away


def test_no_room_while_every_resident_model_is_busy_is_a_503_kind_of_error():
    release = threading.Event()
    started = threading.Event()

    def hold(engine):
        if engine.name == "a":
            started.set()
            release.wait(5)

    group, _ = make_group({"a": 6 * MiB, "b": 6 * MiB}, budget=8 * MiB, on_call=hold)
    t = threading.Thread(target=group.infer, args=("a", {"x": X}))
    t.start()
    assert started.wait(5)
    try:
        with pytest.raises(WeightsBudgetUnavailable) as info:
            group.infer("b", {"x": X}, deadline_s=0.2)
        assert isinstance(info.value, ContextMemoryUnavailable)
        assert "'b'" in str(info.value) and "8.0 MiB" in str(info.value)
    finally:
        release.set()
        t.join()
    assert group.infer("b", {"x": X})["y"][0, 0] == 2  # room once a is idle


def test_ensure_resident_waits_no_longer_than_its_deadline_and_tier_says_where_weights_are():
    """A replica brings weights back before a request's call (GroupDeployment._page_in_first),
    within what is left of that request's deadline, not the group's whole deadline."""
    release, started = threading.Event(), threading.Event()

    def hold(engine):
        if engine.name == "a":
            started.set()
            release.wait(5)

    group, _ = make_group({"a": 6 * MiB, "b": 6 * MiB}, budget=8 * MiB, on_call=hold)
    assert group.tier("a") is WeightsTier.UNLOADED
    group.infer("b", {"x": X})
    t = threading.Thread(target=group.infer, args=("a", {"x": X}))
    t.start()
    assert started.wait(5)
    try:
        assert (group.tier("a"), group.tier("b")) == (WeightsTier.GPU, WeightsTier.HOST)
        t0 = time.monotonic()
        with pytest.raises(WeightsBudgetUnavailable):
            group.ensure_resident("b", deadline_s=0.2)
        assert time.monotonic() - t0 < 5  # the group's own deadline is 30 s
    finally:
        release.set()
        t.join()
    group.ensure_resident("b", deadline_s=1.0)
    assert (group.tier("a"), group.tier("b")) == (WeightsTier.HOST, WeightsTier.GPU)


def test_page_out_cold_frees_least_recently_used_idle_models():
    group, _ = make_group({"a": MiB, "b": 2 * MiB, "c": 3 * MiB}, budget=None)
    for name in ("c", "a", "b"):
        group.infer(name, {"x": X})
    assert group.page_out_cold(3 * MiB) == ["c"]
    assert group.page_out_cold(2 * MiB) == ["a", "b"]
    assert group.resident_weights_bytes() == 0
    assert group.page_out_cold(MiB) == []
    assert group.page_out("a") == 0  # already on the host


def test_page_out_by_name_and_ensure_resident():
    group, _ = make_group({"a": 2 * MiB}, budget=None)
    assert group.ensure_resident("a") >= 0
    assert tiers(group) == {"a": "gpu"}
    assert group.ensure_resident("a") == 0.0
    assert group.page_out("a") == 2 * MiB
    assert tiers(group) == {"a": "host"}
    assert group.ensure_resident("a") > 0
    s = group.status()[0]
    assert (s.page_ins, s.page_outs) == (1, 1) and s.page_in_seconds_total > 0


def test_group_calls_share_one_admission_one_calls_context_at_a_time():
    inside = []
    lock = threading.Lock()
    both_started = threading.Barrier(2, timeout=5)

    def record(engine):
        with lock:
            inside.append(group.admission.used_bytes)

    group, _ = make_group({"a": MiB, "b": MiB}, budget=None, on_call=record)
    group.infer("a", {"x": np.ones((4, 2), np.float32)})  # a's largest call: 4 samples
    assert group.context_bytes_per_call() == 4 * CONTEXT_PER_SAMPLE
    assert all(group.engine(n).admission is group.admission for n in ("a", "b"))

    def call(name):
        both_started.wait()
        group.infer(name, {"x": np.ones((4, 2), np.float32)})

    threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert group.admission.peak_used_bytes == 4 * CONTEXT_PER_SAMPLE
    assert max(inside) == 4 * CONTEXT_PER_SAMPLE


def test_group_admission_times_out_with_numbers():
    adm = GroupAdmission(lambda: 100, where="group g")
    with adm.reserve(80, 1.0):
        with pytest.raises(ContextMemoryUnavailable, match="group g"):
            with adm.reserve(50, 0.05):
                pass
        with adm.reserve(20, 0.05):  # fits beside the first
            assert adm.used_bytes == 100
    assert adm.used_bytes == 0


def test_set_mode_reaches_every_engine_and_static_context_goes_with_the_weights():
    group, _ = make_group({"a": 6 * MiB, "b": 6 * MiB}, budget=8 * MiB)
    group.set_mode("static")
    assert {group.engine(n).mode for n in ("a", "b")} == {MemoryMode.STATIC}
    group.infer("a", {"x": X})
    assert group.engine("a")._static_held
    group.infer("b", {"x": X})
    assert not group.engine("a")._static_held  # paged out: its static context was given back
    group.infer("a", {"x": X})
    assert group.engine("a")._static_held


# -- the PyTorch backend on a CPU -----------------------------------------------------


def _torch_engine(name: str, seed: int) -> PyTorchEngine:
    return PyTorchEngine.from_architecture(name, "resnet18", max_batch=2, seed=seed, image_size=32, device="cpu")


def test_pytorch_cpu_page_out_frees_storage_and_page_in_is_bit_identical():
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    engine = _torch_engine("r", 1)
    before = engine.infer({"input": x})["output"]
    params = list(engine._module.parameters())
    nbytes = engine.page_out_weights(host=True)
    assert nbytes == engine.describe().weights_bytes
    assert engine.weights_tier is WeightsTier.HOST
    assert all(p.numel() == 0 for p in params)  # the module's own storage is gone
    assert engine.page_in_weights() > 0
    assert engine.weights_tier is WeightsTier.GPU
    assert [tuple(p.shape) for p in params] == [tuple(p.shape) for p in engine._module.parameters()]
    after = engine.infer({"input": x})["output"]
    assert np.array_equal(before, after)
    # Paged out and called: the call pages in by itself and answers the same.
    engine.page_out_weights()
    assert np.array_equal(engine.infer({"input": x})["output"], before)
    assert engine.tier_counts()["page_ins"] == 2
    engine.close()


def test_pytorch_cpu_group_outputs_stable_and_distinct_through_eviction():
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    one = _torch_engine("probe", 0)
    wb = one.weights_device_bytes()
    one.close()
    group = EngineGroup(GroupBudget(gpu_weights_budget_bytes=2 * wb, host_tier=True))
    for i in range(4):
        group.add(f"m{i}", lambda i=i: _torch_engine(f"m{i}", i))
    first = {n: group.infer(n, {"input": x})["output"] for n in group.names()}
    assert sum(t == "gpu" for t in tiers(group).values()) == 2
    again = {n: group.infer(n, {"input": x})["output"] for n in reversed(group.names())}
    for n in group.names():
        assert np.array_equal(first[n], again[n]), n
    assert not np.array_equal(first["m0"], first["m1"])
    assert sum(s.page_ins for s in group.status()) >= 2
    group.close()


def test_pytorch_cpu_failed_page_in_is_retryable(monkeypatch):
    from engine_runtime.backends import _weights_store

    x = np.ones((1, 3, 32, 32), np.float32)
    engine = _torch_engine("r", 2)
    before = engine.infer({"input": x})["output"]
    engine.page_out_weights()
    real = _weights_store.WeightsLayout.point_at_copies
    calls = {"n": 0}

    def flaky(self, flat):
        calls["n"] += 1
        if calls["n"] == 1:
            # Half the tensors restored, then the host runs out of memory.
            self.slots[0].set(torch.zeros(1))
            raise MemoryError("injected")
        return real(self, flat)

    monkeypatch.setattr(_weights_store.WeightsLayout, "point_at_copies", flaky)
    with pytest.raises(WeightsPageError, match="injected"):
        engine.infer({"input": x})
    assert engine.weights_tier is WeightsTier.HOST
    assert np.array_equal(engine.infer({"input": x})["output"], before)
    engine.close()


def test_pytorch_cpu_unload_rebuilds_from_the_factory():
    x = np.ones((1, 3, 32, 32), np.float32)
    engine = _torch_engine("r", 3)
    before = engine.infer({"input": x})["output"]
    assert engine.page_out_weights(host=False) > 0
    assert engine.weights_tier is WeightsTier.UNLOADED and engine._module is None
    assert np.array_equal(engine.infer({"input": x})["output"], before)
    engine.close()


def test_weights_layout_ties_dtypes_and_alignment():
    from engine_runtime.backends._weights_store import ALIGN, HostWeights, WeightsLayout

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 5)
            self.b = torch.nn.Linear(5, 3)
            self.b.weight = torch.nn.Parameter(self.a.weight.detach().t().contiguous())
            self.tied = self.a  # the same parameters reachable twice
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("count", torch.tensor(7, dtype=torch.int64))
            self.register_buffer("bf", torch.arange(3, dtype=torch.bfloat16))

    m = M()
    layout = WeightsLayout(m)
    assert len(layout.slots) == 7  # a.weight, a.bias, b.weight, b.bias, mask, count, bf
    assert all(s.offset % ALIGN == 0 for s in layout.slots)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    store = HostWeights(m)
    store.page_out()
    assert m.a.weight.numel() == 0 and m.tied.weight is m.a.weight
    store.page_in()
    got = m.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert m.tied.weight is m.a.weight  # still one Parameter


def test_set_budget_pages_out_down_to_it_and_remove_forgets_the_model():
    group, log = make_group({"a": 2 * MiB, "b": 2 * MiB, "c": 2 * MiB}, budget=None)
    for name in ("a", "b", "c"):
        group.infer(name, {"x": X})
    assert group.set_budget(GroupBudget(gpu_weights_budget_bytes=4 * MiB, host_tier=True)) == ["a"]
    assert group.resident_weights_bytes() == 4 * MiB
    group.remove("b")
    assert group.names() == ["a", "c"] and ("close", "b") in log
    assert group.resident_weights_bytes() == 2 * MiB
    with pytest.raises(UnknownModelError):
        group.infer("b", {"x": X})
    assert group.infer("a", {"x": X})["y"][0, 0] == 1  # room made without b


def test_closing_at_interpreter_exit_with_weights_on_the_host_does_not_abort(tmp_path):
    """Serve closes a replica from ``__del__``, possibly while Python shuts down: making tensors
    then (restoring paged-out weights) aborted the process in THPVariable_dealloc."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "exit.py"
    script.write_text(
        "import builtins, numpy as np\n"
        "from engine_runtime import EngineGroup, GroupBudget\n"
        "from engine_runtime.backends.pytorch import PyTorchEngine\n"
        "g = EngineGroup(GroupBudget(gpu_weights_budget_bytes=80 * 2**20, host_tier=True))\n"
        "for n in 'abc':\n"
        "    g.add(n, lambda n=n: PyTorchEngine.from_architecture(n, 'resnet18', max_batch=1, image_size=32,"
        " device='cpu'))\n"
        "x = np.random.rand(1, 3, 32, 32).astype(np.float32)\n"
        "for n in 'abca':\n"
        "    g.infer(n, {'input': x})\n"
        "assert [s.tier.value for s in g.status()] == ['gpu', 'host', 'host']\n"
        "class Holder:\n"
        "    def __del__(self):\n"
        "        g.close()\n"
        "builtins._keep = Holder()\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frame #" not in proc.stderr and "terminate" not in proc.stderr, proc.stderr[-2000:]


def test_group_admission_chains_to_the_replicas_admission():
    import contextlib

    seen = []

    class Recording:
        @contextlib.contextmanager
        def reserve(self, nbytes, deadline_s):
            seen.append(nbytes)
            yield

    group = EngineGroup(GroupBudget(), admission=Recording(), concurrent_calls=2)
    group.add("a", lambda: TierEngine("a", MiB, []))
    group.infer("a", {"x": np.ones((3, 2), np.float32)})
    assert seen == [3 * CONTEXT_PER_SAMPLE]  # the group's budget first, then the replica's, same bytes
    assert group.admission._capacity_fn() == 2 * 4 * CONTEXT_PER_SAMPLE
    with pytest.raises(GroupConfigError):
        EngineGroup(GroupBudget(), concurrent_calls=0)


# -- a resident model's call never waits for another model's weights moving -------------


class _BlockedCopy:
    """Holds one model's page-in or page-out in its "copy" until released."""

    def __init__(self, name: str, direction: str) -> None:
        self.name, self.direction = name, direction
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, engine, direction: str) -> None:
        if engine.name == self.name and direction == self.direction:
            self.entered.set()
            if not self.release.wait(30):
                raise RuntimeError("the blocked copy was never released")


def _call_in_thread(group: EngineGroup, name: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["y"] = group.infer(name, {"x": X})["y"]
        except BaseException as err:  # noqa: BLE001 - the test reads it
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("direction, blocked, counted_mib", [("in", "c", 8), ("out", "b", 12)])
def test_a_resident_models_call_completes_while_another_model_is_paged(direction, blocked, counted_mib):
    """c's call needs b's room: while c's page-in (or b's page-out) is stuck in its copy,
    calls to a, resident, complete, as do the group's views."""
    gate = _BlockedCopy(blocked, direction)
    group, _ = make_group({"a": 4 * MiB, "b": 4 * MiB, "c": 4 * MiB}, budget=8 * MiB, on_page=gate)
    for name in ("c", "a", "b", "a"):  # c to the host at b's call; a used twice: b goes next
        group.infer(name, {"x": X})
    cold, cold_out = _call_in_thread(group, "c")
    try:
        assert gate.entered.wait(10), f"{blocked}'s page-{direction} never started"
        for _ in range(3):
            hot, hot_out = _call_in_thread(group, "a")
            hot.join(10)
            assert not hot.is_alive(), f"a call to a resident model waited for {blocked}'s page-{direction}"
            assert "error" not in hot_out and float(hot_out["y"][0, 0]) == 1.0
        assert not gate.release.is_set() and cold.is_alive()
        # The views answer too; the weights on the device stay within the budget (the bytes
        # counted include the ones moving: b's until its page-out ends, c's from its plan).
        assert sum(s.weights_bytes for s in group.status() if s.tier is WeightsTier.GPU) <= 8 * MiB
        assert group.resident_weights_bytes() == counted_mib * MiB
    finally:
        gate.release.set()
        cold.join(10)
    assert "error" not in cold_out and float(cold_out["y"][0, 0]) == 3.0
    assert tiers(group) == {"a": "gpu", "b": "host", "c": "gpu"}


# -- the page-out order keeps frequently used models resident ------------------------------


def test_a_frequently_used_model_outlives_a_run_of_one_off_calls():
    """LRU would page h out at c's call (h's last use is the oldest); h has two uses, a and
    b one each, so a and then b go, and h is never paged out."""
    group, log = make_group({n: MiB for n in ("h", "a", "b", "c", "d")}, budget=3 * MiB)
    for name in ("h", "h", "a", "b", "c", "d"):
        group.infer(name, {"x": X})
    assert [e for e in log if e[0] == "out"] == [("out", "a"), ("out", "b")]
    assert tiers(group) == {"h": "gpu", "a": "host", "b": "host", "c": "gpu", "d": "gpu"}


def test_zipf_traffic_never_pages_the_hottest_models_out():
    """The density benchmark's traffic (Zipf s=1.1 over 200 models, 32 resident), one call at
    a time: once warm, the three hottest models' calls never page in (under LRU, about 1 in
    250 of them did: each a page-out plus a page-in in the hot models' p99)."""
    n_models, resident, calls, warm = 200, 32, 6000, 1000
    group, _ = make_group({f"m{i}": MiB for i in range(n_models)}, budget=resident * MiB)
    weights = 1.0 / np.arange(1, n_models + 1) ** 1.1
    draws = np.random.default_rng(1).choice(n_models, size=calls, p=weights / weights.sum())
    for k in draws[:warm]:
        group.infer(f"m{k}", {"x": X})
    before = {s.name: s.page_ins for s in group.status()}
    for k in draws[warm:]:
        group.infer(f"m{k}", {"x": X})
    after = {s.name: s.page_ins for s in group.status()}
    hot_page_ins = {n: after[n] - before[n] for n in ("m0", "m1", "m2")}
    assert hot_page_ins == {"m0": 0, "m1": 0, "m2": 0}
    assert group.resident_weights_bytes() <= resident * MiB


def test_a_page_in_asked_for_is_not_a_use():
    """ensure_resident (a replica preloading its models) moves recency only: ``a``, called
    once and then asked onto the GPU, is still a one-call model, older than ``b``."""
    group, log = make_group({"a": MiB, "b": MiB, "c": MiB}, budget=2 * MiB)
    group.infer("a", {"x": X})
    group.ensure_resident("a")
    group.infer("b", {"x": X})
    group.infer("c", {"x": X})
    assert [e for e in log if e[0] == "out"] == [("out", "a")]
