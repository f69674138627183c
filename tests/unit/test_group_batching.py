"""The group replica's request path without Ray running: ``GroupDeployment.infer`` and its
batch handler on a stand-in ``EngineGroup`` (``deployments.batcher``, in plain
asyncio; the request's multiplexed model id is set per task).

What must hold: one engine call never mixes models, even when Serve's own split by model
id is not there; one model's failing call fails only that model's requests; and a model
the group does not hold is refused before Serve's loader runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.call_path import CallPath
from deployments.group import GroupDeployment
from engine_runtime import ContextMemoryUnavailable, UnknownModelError, WeightsTier

MODEL_ID: contextvars.ContextVar[str] = contextvars.ContextVar("model_id", default="")


class StandInGroup:
    """Each model multiplies by its own factor; ``broken`` models refuse every call."""

    def __init__(self, factors: dict[str, float], broken: tuple[str, ...] = ()) -> None:
        self.factors = factors
        self.broken = broken
        self.calls: list[tuple[str, int]] = []  # (model, batch)
        self.lock = threading.Lock()

    def infer(self, name, inputs, *, deadline_s=None, finite_checked=False):
        with self.lock:
            self.calls.append((name, inputs["x"].shape[0]))
        if name in self.broken:
            raise ContextMemoryUnavailable(10, 0, waited_s=0.0, where=f"stand-in {name}")
        return {"y": inputs["x"] * self.factors[name]}

    def engine(self, name):
        return SimpleNamespace(checks_finite_on_device=False)

    def tier(self, name):
        return WeightsTier.GPU

    def names(self) -> list[str]:  # the replica's __del__ closes its group and counts what is held
        return []

    def close(self) -> None:
        pass


def replica(group: StandInGroup):
    obj = object.__new__(GroupDeployment.func_or_class)
    obj.engines = group
    obj.models = {n: SimpleNamespace(reject_non_finite=True) for n in group.factors}
    obj.descs = {n: SimpleNamespace(max_batch=8) for n in group.factors}
    obj._validation_keys = {n: ("stand-in", n) for n in group.factors}
    obj.group = SimpleNamespace(name="zoo")
    obj.app = SimpleNamespace(coordinator=SimpleNamespace(admission_deadline_s=1.0))
    obj.loads: list[str] = []
    obj.call_path = CallPath()

    async def load(model_id: str) -> str:
        obj.loads.append(model_id)
        return model_id

    obj._load_model = load
    return obj


@pytest.fixture(autouse=True)
def _outside_a_replica(monkeypatch):
    from ray import serve

    monkeypatch.setattr("deployments.group.validate_inputs", lambda desc, inputs, *, reject_non_finite=True: {})
    monkeypatch.setattr(serve, "get_multiplexed_model_id", MODEL_ID.get)


LOOP = asyncio.new_event_loop()


@pytest.fixture(autouse=True, scope="module")
def _stop_the_batch_workers():
    """Each replica object's batcher has a worker task on LOOP: stop them before it closes."""
    yield
    tasks = asyncio.all_tasks(LOOP)
    for task in tasks:
        task.cancel()
    LOOP.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    LOOP.close()


def rows(value: float, n: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((n, 3), value, dtype=np.float32)}


def call_all(obj, requests: list[tuple[str, dict]]):
    async def one(model, inputs):
        MODEL_ID.set(model)  # this task's request context, as Serve sets it per request
        return await obj.infer(inputs)

    async def gather():
        tasks = [asyncio.create_task(one(m, x), context=contextvars.copy_context()) for m, x in requests]
        return await asyncio.gather(*tasks, return_exceptions=True)

    return LOOP.run_until_complete(gather())


def test_a_batch_of_several_models_makes_one_call_per_model_and_answers_each_request():
    group = StandInGroup({"a": 2.0, "b": 3.0, "c": 5.0})
    obj = replica(group)
    obj._batched.set_max_batch_size(8)
    obj._batched.set_batch_wait_timeout_s(0.05)
    requests = [("a", rows(1.0)), ("b", rows(1.0)), ("a", rows(2.0)), ("c", rows(1.0)), ("b", rows(4.0))]
    got = call_all(obj, requests)
    for (model, x), out in zip(requests, got):
        np.testing.assert_array_equal(out["y"], x["x"] * group.factors[model])
    assert sorted(group.calls) == [("a", 2), ("b", 2), ("c", 1)], group.calls


def test_one_model_s_failing_call_fails_only_its_requests():
    group = StandInGroup({"a": 2.0, "bad": 1.0}, broken=("bad",))
    obj = replica(group)
    got = call_all(obj, [("a", rows(1.0)), ("bad", rows(1.0)), ("a", rows(3.0))])
    assert isinstance(got[1], ContextMemoryUnavailable) and "stand-in bad" in str(got[1])
    np.testing.assert_array_equal(got[0]["y"], rows(2.0)["x"])
    np.testing.assert_array_equal(got[2]["y"], rows(6.0)["x"])


def test_an_unknown_model_is_refused_before_serve_s_loader_runs():
    group = StandInGroup({"a": 2.0})
    obj = replica(group)
    (err,) = call_all(obj, [("nope", rows(1.0))])
    assert isinstance(err, UnknownModelError) and "unknown model 'nope' in group 'zoo'; known models: [a]" in str(err)
    (err,) = call_all(obj, [("", rows(1.0))])
    assert isinstance(err, UnknownModelError) and "multiplexed_model_id" in str(err)
    assert obj.loads == [] and group.calls == []


def test_a_group_that_cannot_start_gives_back_what_it_took(monkeypatch):
    """A model whose weights exceed the whole budget fails the replica's start; the
    engines built so far, the admission budget and nothing else are given back."""
    from deployments import coordinator_client, group, replica
    from deployments.config import parse_app_config
    from deployments.gpu_identity import GpuIdentity
    from engine_runtime import GroupConfigError

    closed = []
    monkeypatch.setattr(replica, "current_replica_gpu", lambda: GpuIdentity("vgpu-test-0", None, True, "node"))
    monkeypatch.setattr(group.serve, "get_replica_context", lambda: None)
    monkeypatch.setattr(coordinator_client, "admission_for", lambda gpu: SimpleNamespace(
        close=lambda: closed.append("admission")))
    cfg = parse_app_config({
        "groups": [{"name": "g", "gpu_weights_budget_bytes": 1 << 20}],
        "models": [{"name": n, "group": "g", "source": {"architecture": "bert-tiny", "seed": i},
                    "input": {"max_batch": 1, "seq_len": 8}, "backend": "pytorch"} for i, n in enumerate("ab")]})
    with pytest.raises(GroupConfigError, match="larger than group 'g'"):
        GroupDeployment.func_or_class(cfg.groups[0].model_dump(mode="json"),
                                      [m.model_dump(mode="json") for m in cfg.models], cfg.dump_for_replicas())
    assert closed == ["admission"]


def test_user_config_sets_every_engine_s_mode_and_the_batch_queue_and_refuses_weights():
    from engine_runtime import MemoryMode

    class Modes(StandInGroup):
        def set_mode(self, mode):
            self.mode = mode

    group = Modes({"a": 1.0, "b": 1.0})
    obj = replica(group)
    obj.descs = {"a": SimpleNamespace(max_batch=4), "b": SimpleNamespace(max_batch=2)}
    obj.group = SimpleNamespace(name="zoo", batching=SimpleNamespace(max_batch_size=8, batch_wait_timeout_s=0.01))
    obj.pin, obj.mode = "auto", MemoryMode.DYNAMIC
    obj.reconfigure({"mode": "static", "max_batch_size": 16})
    assert obj.mode is MemoryMode.STATIC and group.mode is MemoryMode.STATIC
    assert obj._batching == {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}  # capped by the largest profile
    obj.reconfigure({"pin": "dynamic"})
    assert (obj.pin, obj.mode) == ("dynamic", MemoryMode.DYNAMIC)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weights'\].*single-model deployments"):
        obj.reconfigure({"weights": {"seed": 3}})


class PagingGroup(StandInGroup):
    """``cold`` starts in host memory; bringing it back blocks until ``copied`` is set,
    as a slow copy would. Its engine call brings it back itself if nobody did first."""

    def __init__(self, factors: dict[str, float]) -> None:
        super().__init__(factors)
        self.tiers = {n: WeightsTier.GPU for n in factors} | {"cold": WeightsTier.HOST}
        self.copied = threading.Event()
        self.paged_in_by: list[str] = []

    def tier(self, name):
        return self.tiers[name]

    def ensure_resident(self, name, deadline_s=None):
        return self._page_in(name, "ensure_resident")

    def _page_in(self, name, by):
        if self.tiers[name] is WeightsTier.HOST:
            assert self.copied.wait(10), "the test never let the copy finish"
            self.tiers[name] = WeightsTier.GPU
            self.paged_in_by.append(by)
        return 0.0

    def infer(self, name, inputs, *, deadline_s=None, finite_checked=False):
        self._page_in(name, "the call")
        return super().infer(name, inputs, deadline_s=deadline_s, finite_checked=finite_checked)


def test_a_resident_model_is_answered_while_another_model_s_weights_come_back_from_host_memory():
    """Serve runs one batch at a time: a page-in inside the cold model's engine call held
    the hot model's requests behind the copy. Paged in before the batch queue, it does not."""
    group = PagingGroup({"hot": 2.0, "cold": 3.0})
    obj = replica(group)
    obj._batched.set_max_batch_size(8)
    obj._batched.set_batch_wait_timeout_s(0.01)

    async def one(model, inputs):
        MODEL_ID.set(model)
        return await obj.infer(inputs)

    async def scenario():
        cold = asyncio.create_task(one("cold", rows(1.0)), context=contextvars.copy_context())
        await asyncio.sleep(0.05)  # the cold request is in line first
        hot = asyncio.create_task(one("hot", rows(1.0)), context=contextvars.copy_context())
        try:
            done, _ = await asyncio.wait({hot}, timeout=3.0)
            hot_first = hot in done and not cold.done()
        finally:
            group.copied.set()
        return hot_first, await hot, await cold

    hot_first, hot_out, cold_out = LOOP.run_until_complete(scenario())
    assert hot_first, "the hot model's request waited for the cold model's page-in"
    np.testing.assert_array_equal(hot_out["y"], rows(2.0)["x"])
    np.testing.assert_array_equal(cold_out["y"], rows(3.0)["x"])
    assert group.paged_in_by == ["ensure_resident"]
