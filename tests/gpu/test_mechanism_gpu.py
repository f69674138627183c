"""The one decision of a replica's context mechanism, on the card: the facts the
factory gathers on a GPU with CUDA VMM, the plan they give, and that the engine built
with that plan obtains its memory as planned (``vmm-arena`` alone, ``vmm-pool`` with
the GPU's pool), with correct outputs.

Run on the GPU machine:  .venv/bin/pytest -m gpu tests/gpu/test_mechanism_gpu.py -s
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest

from deployments.config import parse_app_config
from deployments.engine_factory import context_facts, make_engine, plan_replica_context
from engine_runtime.architectures import build
from engine_runtime.memory import POOL_IN_USE, BackendKind, ContextMechanism

pytestmark = pytest.mark.gpu

MODEL = {"name": "r18", "source": {"architecture": "resnet18"}, "input": {"max_batch": 4, "image_size": 64},
         "mode": "dynamic"}


@pytest.fixture
def pool_dir(monkeypatch):
    # Short: the owner's Unix socket path lives here (108 bytes at most).
    d = tempfile.mkdtemp(prefix="ebb")
    monkeypatch.setenv("EBB_POOL_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_facts_on_this_card():
    a = parse_app_config({"models": [MODEL], "context_pool": {"enabled": True}})
    facts = context_facts(a.models[0], a, 0)
    print(facts)
    assert facts.backend is BackendKind.PYTORCH and facts.cuda_index == 0
    assert facts.vmm, "the H200 supports CUDA VMM"
    assert facts.graph_arena, "the CUDA-graph arena's allocator did not load (C compiler?)"
    assert facts.pool_unavailable is None, facts.pool_unavailable


@pytest.mark.parametrize(("pool_enabled", "expected"), [
    (False, ContextMechanism.VMM_ARENA),
    (True, ContextMechanism.VMM_POOL),
])
def test_the_engine_obtains_memory_as_planned(pool_dir, pool_enabled, expected):
    import torch

    a = parse_app_config({"models": [MODEL], "context_pool": {"enabled": pool_enabled}})
    pool, plan = plan_replica_context(a.models[0], a, 0)
    print(plan)
    assert plan.mechanism is expected and plan.join_pool is pool_enabled
    assert (pool is not None) is pool_enabled
    assert (plan.pool_status == POOL_IN_USE) is pool_enabled
    engine = make_engine(a.models[0], a, cuda_index=0, physical_source=pool, context_plan=plan)
    try:
        assert engine.mechanism is expected  # before load: the plan
        engine.warm()
        x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
        out = engine.infer({"input": x})["output"]
        assert engine.mechanism is expected  # after load: what the arena does
        assert engine.stats().context_bytes_held == 0  # dynamic: given back after the call
        model = build("resnet18", seed=0, image_size=64)  # the same weights, eagerly, for the reference
        with torch.inference_mode():
            ref = model.module.cuda()(torch.from_numpy(x).cuda()).cpu().numpy()
        # Normally bit-identical; room for cuDNN picking another (TF32) algorithm in the graph.
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * max(float(np.abs(ref).max()), 1.0))
    finally:
        engine.close()
        if pool is not None:
            pool.shutdown_owner()
            pool.close()
