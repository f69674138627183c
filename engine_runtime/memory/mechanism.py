"""The one place that decides how a replica obtains its context memory.

:func:`plan_context` is a pure function from facts (:class:`ContextFacts`: backend,
device or none, CUDA VMM support, the PyTorch graph arena, the GPU's pool) to a plan
(:class:`ContextPlan`: the ``ContextMechanism``, whether to join the pool, and the
words the status view shows). The Ray floor gathers the facts and tells the backend
the plan (constructor argument ``context_plan``); a backend built without one plans
from its own facts through the same function, so the rules live here only.

The rules, in order:

* no CUDA device: ``host-accounting`` (bytes estimated, host memory is PyTorch's);
* PyTorch without graphs in an arena (no VMM, no C compiler for the capture
  allocator, or graphs turned off): eager calls and ``torch-empty-cache``;
* otherwise a VMM arena, its physical memory leased from the GPU's pool
  (``vmm-pool``) where the config enables the pool and the device can have one,
  else created per call (``vmm-arena``);
* TensorRT without VMM: ``cuda-malloc`` (and no pool: a pool lends VMM memory).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from engine_runtime.memory.modes import ContextMechanism

__all__ = ["POOL_IN_USE", "BackendKind", "ContextFacts", "ContextPlan", "plan_context"]

#: What the status view's ``pool`` field says for a replica that leases from its GPU's pool.
POOL_IN_USE = "in use"


class BackendKind(str, enum.Enum):
    PYTORCH = "pytorch"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class ContextFacts:
    """What decides the mechanism; gathered by the caller, no probing here."""

    backend: BackendKind
    #: The CUDA ordinal the engine runs on; None: no CUDA device (CPU).
    cuda_index: int | None
    #: The device supports CUDA virtual memory management.
    vmm: bool = False
    #: PyTorch: graphs wanted and the capture allocator loadable (it needs a C compiler).
    graph_arena: bool = False
    #: The config asks for the GPU's context pool (``context_pool.enabled``).
    pool_enabled: bool = False
    #: Why the pool cannot be had on this device or replica (None: it can), from
    #: ``pool_available`` or from a failed attempt to join it.
    pool_unavailable: str | None = None

    def without_pool(self, why: str) -> ContextFacts:
        """The same facts after joining the pool failed for ``why``."""
        return replace(self, pool_unavailable=why)


@dataclass(frozen=True)
class ContextPlan:
    """How the replica obtains context memory."""

    mechanism: ContextMechanism
    #: Lease the arena's physical memory from the GPU's pool (the caller joins it).
    join_pool: bool
    #: The status view's ``pool`` field: :data:`POOL_IN_USE`, or why not.
    pool_status: str
    #: Why this mechanism, in words (logs, the status view).
    reason: str

    @property
    def vmm_arena(self) -> bool:
        """Whether the engine builds a stable-address VMM arena."""
        return self.mechanism in (ContextMechanism.VMM_ARENA, ContextMechanism.VMM_POOL)


def plan_context(facts: ContextFacts) -> ContextPlan:
    """The plan for ``facts`` (see the module docstring for the rules)."""
    pool_status = _pool_status(facts)
    if facts.cuda_index is None:
        return ContextPlan(ContextMechanism.HOST_ACCOUNTING, False, pool_status,
                           "no CUDA device: context bytes are estimated, host memory is PyTorch's")
    where = f"cuda:{facts.cuda_index}"
    if facts.backend is BackendKind.PYTORCH and not (facts.vmm and facts.graph_arena):
        why = (f"{where} has no CUDA virtual memory management" if not facts.vmm
               else "CUDA graphs are off or their arena allocator needs a C compiler")
        return ContextPlan(ContextMechanism.TORCH_EMPTY_CACHE, False, pool_status,
                           f"eager PyTorch, cache emptied after each dynamic call: {why}")
    if facts.backend is BackendKind.TENSORRT and not facts.vmm:
        return ContextPlan(ContextMechanism.CUDA_MALLOC, False, pool_status,
                           f"cudaMalloc per call: {where} has no CUDA virtual memory management")
    if pool_status == POOL_IN_USE:
        return ContextPlan(ContextMechanism.VMM_POOL, True, pool_status,
                           f"VMM arena on {where}, physical memory leased from the GPU's pool")
    return ContextPlan(ContextMechanism.VMM_ARENA, False, pool_status,
                       f"VMM arena on {where}, physical memory created per call")


def _pool_status(facts: ContextFacts) -> str:
    """The status view's words for the pool; :data:`POOL_IN_USE` where the replica may lease."""
    if not facts.pool_enabled:
        return "not used: disabled in the config (context_pool.enabled)"
    if facts.pool_unavailable is not None:
        return f"unavailable: {facts.pool_unavailable}"
    if facts.cuda_index is None:
        return "unavailable: this replica has no CUDA device"
    if not facts.vmm:
        return f"unavailable: cuda:{facts.cuda_index} does not support virtual memory management"
    if facts.backend is BackendKind.PYTORCH and not facts.graph_arena:
        # Without its arena the PyTorch backend runs eagerly and would never lease.
        return "unavailable: the PyTorch backend's CUDA-graph arena needs a C compiler"
    return POOL_IN_USE
