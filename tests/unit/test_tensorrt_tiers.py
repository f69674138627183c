"""TensorRT's weights tier against the stand-in runtime: page-out keeps the plan, page-in rebuilds."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import trt_fake

from engine_runtime import EngineGroup, GroupBudget, WeightsTier
from engine_runtime.backends import _trt
from engine_runtime.backends.tensorrt import TensorRTEngine
from engine_runtime.memory import MemoryMode


@pytest.fixture
def world(monkeypatch):
    w = trt_fake.World()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_fake.make_module(w))
    _trt.load.cache_clear()
    yield w
    _trt.load.cache_clear()


@pytest.fixture
def device(world):
    return trt_fake.FakeDevice(world)


X = np.arange(8, dtype=np.float32).reshape(2, 4)


def test_page_out_destroys_engine_and_contexts_and_page_in_deserialises(world, device, tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(trt_fake.GOOD_PLAN)
    engine = TensorRTEngine("t", plan, device=device, mode=MemoryMode.STATIC)
    before = engine.infer({"input": X})["output"]
    assert world.live_strategies() == ["STATIC"]
    assert engine.page_out_weights() == trt_fake.WEIGHTS_BYTES
    assert engine.weights_tier is WeightsTier.HOST
    assert engine._engine is None and world.live_strategies() == []
    plan.unlink()  # the plan is kept in host memory: the file is not needed again
    start = len(world.events)
    after = engine.infer({"input": X})["output"]
    assert ("deserialize", len(trt_fake.GOOD_PLAN)) in world.events[start:]
    assert np.array_equal(before, after)
    assert engine.weights_tier is WeightsTier.GPU and world.live_strategies() == ["STATIC"]
    assert engine.tier_counts()["page_ins"] == 1
    engine.close()


def test_a_refit_survives_page_out(world, device):
    world.refittable = True
    engine = TensorRTEngine("t", trt_fake.GOOD_PLAN, device=device)
    engine.update_weights({"scale": np.array([3.0], dtype=np.float32)})
    refit = engine.infer({"input": X})["output"]
    assert np.array_equal(refit, trt_fake.expected(X, 3.0))
    engine.page_out_weights()
    assert ("serialize",) in world.events
    assert np.array_equal(engine.infer({"input": X})["output"], refit)
    engine.close()


def test_trt_engines_in_a_group_page_by_budget(world, device):
    group = EngineGroup(GroupBudget(gpu_weights_budget_bytes=trt_fake.WEIGHTS_BYTES, host_tier=True))
    for name in ("a", "b"):
        group.add(name, lambda name=name: TensorRTEngine(name, trt_fake.GOOD_PLAN, device=device))
    ya = group.infer("a", {"input": X})["output"]
    yb = group.infer("b", {"input": X})["output"]
    assert {s.name: s.tier for s in group.status()} == {"a": WeightsTier.HOST, "b": WeightsTier.GPU}
    assert np.array_equal(group.infer("a", {"input": X})["output"], ya) and np.array_equal(ya, yb)
    group.close()
