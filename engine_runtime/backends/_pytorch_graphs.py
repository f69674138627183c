"""The PyTorch backend's CUDA graphs: one per batch-size bucket, captured into a VMM arena.

Each bucket's graph has a private memory pool in its own window of a stable-address
arena (``engine_runtime.memory.arena``), so the arena can unmap the window's physical
memory between calls (DYNAMIC) and map it again at the same addresses before a replay.
Here: the bucket sizes, capture, the per-bucket pieces made once (pinned host staging,
the NaN check's scalar, the window's allocate), replay, and teardown in the order
PyTorch requires. ``PyTorchEngine`` (``backends/pytorch.py``) owns the lifecycle that
calls them.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine_runtime import _cuda, cuda_process
from engine_runtime.backends import _graph_alloc
from engine_runtime.errors import EbbInternalError, InputValueError
from engine_runtime.memory import ContextBlock
from engine_runtime.memory.arena import OwnedPhysical, VmmArena
from engine_runtime.units import MiB

# The engine's own logger: what capture logs reads as the PyTorch backend's.
logger = logging.getLogger("engine_runtime.backends.pytorch")


@dataclass
class _Bucket:
    batch: int
    graph: Any
    static_input: torch.Tensor
    static_output: torch.Tensor
    pool: Any
    context_bytes: int
    #: Start of this bucket's address window in the arena (windows never overlap).
    offset: int
    #: Pinned host staging, made once: host inputs are copied in and sent with one
    #: asynchronous copy, outputs come back the same way (a pageable copy is synchronous
    #: and goes through the driver's own staging).
    host_input: torch.Tensor | None = None
    host_output: torch.Tensor | None = None
    #: The NaN/inf check's scalar on the device, reused instead of allocated per call.
    check_sum: torch.Tensor | None = None
    #: ``allocate(nbytes)`` for this bucket's window in DYNAMIC mode, made once.
    allocate: Callable[[int], ContextBlock] | None = None


def batch_buckets(min_batch: int, max_batch: int) -> list[int]:
    """Powers of two from ``min_batch`` up, plus ``max_batch``: one graph per bucket."""
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        if b >= min_batch:
            sizes.add(b)
        b *= 2
    return sorted(sizes)


def _clear_cublas_workspaces() -> None:
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()


class PyTorchGraphs:
    """CUDA-graph hooks of ``PyTorchEngine``: capture, staging, replay, teardown."""

    def _capture_graphs(self, lib: _graph_alloc.ArenaAllocatorLib, index: int) -> None:
        sizes = batch_buckets(self._profile.min[0], self._profile.max[0])
        # Warm up eagerly (cuDNN picks algorithms, lazy modules load) and size the arena
        # from the eager peak; the graph needs less, never more in practice, and the
        # allocator refuses (raises) rather than overflow.
        peak = max(self._warm_up(sizes).values())
        # Give the warm-up's cached blocks back before capture maps its own memory: a
        # starting replica then needs the larger of the two at once, not their sum (on a
        # crowded card the sum is what failed a replica's start; docs/benchmarks.md §3).
        _clear_cublas_workspaces()
        torch.cuda.empty_cache()
        # Windows are counted in the physical source's chunks when it has them (a pool).
        gran = max(_cuda.granularity(index), int(getattr(self._physical_source, "chunk_bytes", 0) or 0))
        window = _cuda.round_up(2 * peak + 256 * MiB, gran)
        offsets = [i * window for i in range(len(sizes))]
        self._arena = VmmArena(index, window * len(sizes), self._physical_source,
                               deadline_s=self.admission_deadline_s)
        # From the first capture on, the process's CUDA stack limit must not change.
        cuda_process.note_graphs_captured(len(sizes))
        with _graph_alloc.capture_lock:
            # One physical backing behind every window while capturing; released right after.
            # Physical memory for capture: the eager peak and a margin, not the whole window,
            # so a replica can start on a crowded card. The hook refuses (PyTorch raises
            # out of memory) past it rather than write outside what is mapped.
            capture_bytes = min(window, _cuda.round_up(peak * 5 // 4 + 128 * MiB, gran))
            # On the GPU's pool, capture leases from it like a static replica (it grows
            # the pool for the start, and the chunks serve calls after): a starting
            # replica's transient memory then goes through what admits calls, instead of
            # beside it where the pool and the other replicas could not see it.
            pooled = self._physical_source is not None
            # Off the pool, capture memory is created beside the calls' memory: the GPU's
            # budget holds its bytes while it exists, as it holds a dynamic call's.
            admitted = contextlib.ExitStack()
            if not pooled:
                admitted.enter_context(self.admission.reserve(capture_bytes, self.admission_deadline_s))
            try:
                block = self._arena.allocate(capture_bytes, offsets, source=None if pooled else OwnedPhysical(index),
                                             standing=pooled)
            except BaseException:
                admitted.close()
                raise
            try:
                for b, offset in zip(sizes, offsets):
                    # cuBLAS keeps one workspace per (handle, stream), made on first use.
                    # Dropped before each capture, it is made again inside this bucket's
                    # pool (arena window), mapped whenever this graph replays; kept, it
                    # would point into the warm-up's memory or another bucket's window.
                    _clear_cublas_workspaces()
                    lib.set_range(self._arena.base + offset, block.nbytes)
                    pool = torch.cuda.MemPool(lib.allocator.allocator())
                    with torch.cuda.use_mem_pool(pool, self._device):
                        static_input = self._sample(b)
                    graph = torch.cuda.CUDAGraph()
                    with torch.inference_mode(), torch.cuda.stream(self._stream):
                        with torch.cuda.graph(graph, pool=pool.id, stream=self._stream):
                            static_output = self._module(static_input)
                    used = _cuda.round_up(lib.high_water(), gran)
                    self._buckets[b] = _Bucket(b, graph, static_input, static_output, pool, used, offset)
                # Launch every graph once while memory is mapped behind it: a graph's first
                # launch may need device memory of its own (uploading the executable graph),
                # which must happen at start, not first under pressure (a bucket used only
                # when batching merges a new size, say), where it failed as a bare CUDA error.
                with torch.inference_mode(), torch.cuda.stream(self._stream):
                    for bucket in self._buckets.values():
                        bucket.graph.replay()
                self._stream.synchronize()
                self._stage_buckets()
            finally:
                lib.set_range(0, 0)  # any stray allocation from the hook now fails loudly
                try:
                    block.release()
                finally:
                    admitted.close()
        self._mech = self._arena.mechanism
        # Warm-up blocks and cuBLAS workspaces live in the caching allocator: give them back
        # so an idle replica holds its weights and CUDA context only.
        _clear_cublas_workspaces()
        torch.cuda.empty_cache()
        logger.info("engine %s: captured %d graphs in a %.0f MiB arena; context %s MiB by batch",
                    self.name, len(self._buckets), self._arena.reserved_bytes / MiB,
                    {b: round(k.context_bytes / MiB) for b, k in self._buckets.items()})

    def _stage_buckets(self) -> None:
        """The per-bucket pieces a call would otherwise make each time (outside the arena)."""
        self._bucket_list = [self._buckets[b] for b in sorted(self._buckets)]
        self._bucket_sizes = [bucket.batch for bucket in self._bucket_list]
        for bucket in self._bucket_list:
            bucket.host_input = torch.empty(tuple(bucket.static_input.shape), dtype=bucket.static_input.dtype,
                                            pin_memory=True)
            bucket.host_output = torch.empty(tuple(bucket.static_output.shape), dtype=bucket.static_output.dtype,
                                             pin_memory=True)
            if bucket.static_input.dtype.is_floating_point:
                bucket.check_sum = torch.empty((), dtype=bucket.static_input.dtype, device=self._device)
            bucket.allocate = functools.partial(self._allocate_window, bucket.offset)

    def _allocate_window(self, offset: int, nbytes: int) -> ContextBlock:
        # Read when memory is wanted: what is left of this call's deadline.
        return self._arena.allocate(nbytes, (offset,), deadline_s=self.call_deadline_s)

    def _bucket_for(self, batch: int) -> _Bucket:
        i = bisect.bisect_left(self._bucket_sizes, batch)
        if i == len(self._bucket_list):
            raise EbbInternalError(f"batch {batch} above every bucket {self._bucket_sizes}; inputs were not validated")
        return self._bucket_list[i]

    def _replay(self, bucket: _Bucket, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        self._after_caller(x)
        check = self.reject_non_finite and x.dtype.is_floating_point
        device_input = bucket.static_input[:batch]
        with torch.cuda.stream(self._stream):
            if x.is_cuda:
                device_input.copy_(x, non_blocking=True)
            else:
                # Into pinned memory (host copy), then one asynchronous copy on our stream.
                staged = bucket.host_input[:batch]
                staged.copy_(x)
                device_input.copy_(staged, non_blocking=True)
            if batch < bucket.batch:
                # The graph runs on all bucket.batch rows: fill the padding rows with a
                # valid value (0: a valid token id, a valid image) before the replay. The
                # static input lives in the graph's arena window, whose physical memory
                # may just have held another process's data (the GPU's context pool hands
                # the same chunks from replica to replica): a padded row of garbage ids
                # made BERT's embedding kernel assert, which poisons the whole CUDA context
                # (every later call of the replica failed). A memset on our stream, into
                # a view: nothing is allocated.
                bucket.static_input[batch:].zero_()
            # NaN/inf check on the device: one reduction into a scalar made once, read
            # after the stream is synchronised below. (A host pass over a 60 MB batch
            # costs ~10 ms.)
            total = (torch.sum(device_input, dim=tuple(range(device_input.dim())), out=bucket.check_sum)
                     if check else None)
            bucket.graph.replay()
            host_out = bucket.host_output[:batch]
            host_out.copy_(bucket.static_output[:batch], non_blocking=True)
        # Before the arena is unmapped (dynamic mode) and before the staging is read.
        self._stream.synchronize()
        # The caller keeps the output: a copy (pageable) out of the staging the next call reuses.
        out = torch.empty(host_out.shape, dtype=host_out.dtype).copy_(host_out)
        if total is not None and not math.isfinite(total.item()):
            # A non-finite sum means a NaN/inf input, or finite values whose sum
            # overflowed: tell the two apart exactly, on the host, only in that case.
            if not bool(torch.isfinite(x).all()):
                raise InputValueError(self._input.name, "contains NaN or infinity")
        return out

    def _release_graphs(self) -> None:
        """Free every bucket and the arena (the stream synchronised first, by the caller)."""
        # Order matters: graphs first, then the tensors living in each private pool, then
        # the pools; a tensor freed after its pool is gone makes PyTorch abort
        # ("invalid device pointer").
        for bucket in self._buckets.values():
            bucket.graph.reset()
        for bucket in self._buckets.values():
            bucket.static_input = bucket.static_output = bucket.check_sum = None
            bucket.host_input = bucket.host_output = bucket.allocate = None
        self._bucket_list, self._bucket_sizes = [], []
        for bucket in self._buckets.values():
            bucket.pool = None
        self._buckets.clear()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
