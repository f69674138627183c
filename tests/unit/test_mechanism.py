"""The one decision of how a replica obtains context memory, as a table of cases."""

from __future__ import annotations

import pytest

from engine_runtime.memory import POOL_IN_USE, BackendKind, ContextFacts, ContextMechanism, plan_context

PT, TRT = BackendKind.PYTORCH, BackendKind.TENSORRT
M = ContextMechanism


@pytest.mark.parametrize(("facts", "mechanism", "join_pool", "pool_status"), [
    # No CUDA device: bytes are accounted on the host, whatever else is true.
    (ContextFacts(PT, None), M.HOST_ACCOUNTING, False, "not used: disabled in the config (context_pool.enabled)"),
    (ContextFacts(PT, None, pool_enabled=True, pool_unavailable="this replica has no CUDA device"),
     M.HOST_ACCOUNTING, False, "unavailable: this replica has no CUDA device"),
    (ContextFacts(PT, None, pool_enabled=True), M.HOST_ACCOUNTING, False,
     "unavailable: this replica has no CUDA device"),
    # PyTorch on a GPU: graphs in a VMM arena, else eager with the cache emptied.
    (ContextFacts(PT, 0, vmm=True, graph_arena=True), M.VMM_ARENA, False,
     "not used: disabled in the config (context_pool.enabled)"),
    (ContextFacts(PT, 0, vmm=True, graph_arena=False), M.TORCH_EMPTY_CACHE, False,
     "not used: disabled in the config (context_pool.enabled)"),
    (ContextFacts(PT, 0, vmm=False, graph_arena=True), M.TORCH_EMPTY_CACHE, False,
     "not used: disabled in the config (context_pool.enabled)"),
    (ContextFacts(PT, 0, vmm=True, graph_arena=True, pool_enabled=True), M.VMM_POOL, True, POOL_IN_USE),
    (ContextFacts(PT, 0, vmm=True, graph_arena=False, pool_enabled=True), M.TORCH_EMPTY_CACHE, False,
     "unavailable: the PyTorch backend's CUDA-graph arena needs a C compiler"),
    (ContextFacts(PT, 0, vmm=True, graph_arena=True, pool_enabled=True, pool_unavailable="owner gone"),
     M.VMM_ARENA, False, "unavailable: owner gone"),
    # TensorRT: an arena where VMM exists, else cudaMalloc; the pool needs VMM.
    (ContextFacts(TRT, 0, vmm=True), M.VMM_ARENA, False, "not used: disabled in the config (context_pool.enabled)"),
    (ContextFacts(TRT, 0, vmm=False), M.CUDA_MALLOC, False,
     "not used: disabled in the config (context_pool.enabled)"),
    (ContextFacts(TRT, 0, vmm=True, pool_enabled=True), M.VMM_POOL, True, POOL_IN_USE),
    (ContextFacts(TRT, 1, vmm=False, pool_enabled=True), M.CUDA_MALLOC, False,
     "unavailable: cuda:1 does not support virtual memory management"),
])
def test_plan(facts, mechanism, join_pool, pool_status):
    plan = plan_context(facts)
    assert (plan.mechanism, plan.join_pool, plan.pool_status) == (mechanism, join_pool, pool_status)
    assert plan.reason
    assert plan.vmm_arena == (mechanism in (M.VMM_ARENA, M.VMM_POOL))


def test_a_failed_join_falls_back_to_the_engines_own_arena_and_says_why():
    facts = ContextFacts(TRT, 0, vmm=True, pool_enabled=True)
    assert plan_context(facts).join_pool
    plan = plan_context(facts.without_pool("owner at /dev/shm/x.sock unreachable"))
    assert plan.mechanism is M.VMM_ARENA and not plan.join_pool
    assert plan.pool_status == "unavailable: owner at /dev/shm/x.sock unreachable"
