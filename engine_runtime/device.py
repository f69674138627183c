"""Public questions about the CUDA devices this process sees, for the Ray floor.

``deployments/`` asks these instead of reaching into the private driver wrappers
(``engine_runtime._cuda``) or the backends' internals.
"""

from __future__ import annotations


__all__ = ["check_reachable", "graph_arena_available", "vmm_supported"]


def check_reachable(index: int) -> None:
    """Raise (``EbbInternalError`` subclass) if ``cuda:index`` cannot answer a memory query."""
    from engine_runtime import _cuda

    _cuda.mem_get_info(index)


def graph_arena_available() -> bool:
    """Whether the PyTorch backend can capture CUDA graphs into its VMM arena here (it
    needs a C compiler for the pluggable allocator); without it, it runs eagerly."""
    from engine_runtime.backends import _graph_alloc

    return _graph_alloc.load() is not None


def vmm_supported(index: int) -> bool:
    """Whether ``cuda:index`` supports CUDA virtual memory management (False without a driver)."""
    from engine_runtime import _cuda

    return _cuda.vmm_supported(index)
