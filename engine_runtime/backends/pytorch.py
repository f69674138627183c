"""The PyTorch backend: same interface and modes as TensorRT, for hosts without it.

On a GPU with CUDA VMM and a C compiler, each batch-size bucket is captured once as
a CUDA graph whose private memory pool lives in a stable-address arena
(``engine_runtime.memory.arena``). STATIC keeps the arena's physical memory mapped; DYNAMIC
maps it for a call and unmaps it (back to the driver, or to the GPU's pool) after.
Without the arena it runs eagerly and DYNAMIC empties PyTorch's cache after each
call. On a CPU it runs eagerly for real; "context memory" there is an accounted
estimate (see ``_activation_bytes_per_sample``), since PyTorch's CPU allocator owns
the host memory.

Capture, staging and replay live in ``_pytorch_graphs``; this module is the engine's
lifecycle (load, weights, each mechanism's call path, unload).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from engine_runtime import _cuda, cuda_process
from engine_runtime.architectures import build
from engine_runtime.backends import _graph_alloc
from engine_runtime.backends._pytorch_graphs import PyTorchGraphs, _Bucket, batch_buckets
from engine_runtime.backends._tiers import PyTorchTiers
from engine_runtime.engine import BaseEngine
from engine_runtime.errors import (
    EngineLoadError,
    WeightsUpdateError,
)
from engine_runtime.memory import (
    ContextBlock,
    ContextMechanism,
    HostAccountingAllocator,
    MemoryMode,
)
from engine_runtime.memory.admission import (
    Admission,
    admitted_transient,
    warmup_estimate_bytes,
)
from engine_runtime.memory.arena import PhysicalSource, VmmArena
from engine_runtime.memory.mechanism import (
    BackendKind,
    ContextFacts,
    ContextPlan,
    plan_context,
)
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec, batch_of
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
                 "bool": torch.bool}


#: Admitted for the first warm-up step, before any bucket was measured: cuBLAS/cuDNN
#: workspaces and a small model's batch-1 activations fit in it.
_WARMUP_FLOOR_BYTES = 64 * MiB


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # Memory pools and the arena need an explicit ordinal; "cuda" means the current one.
        return torch.device("cuda", torch.cuda.current_device())
    return dev


class PyTorchEngine(PyTorchGraphs, PyTorchTiers, BaseEngine):
    def __init__(
        self,
        name: str,
        module: nn.Module | Callable[[], nn.Module],
        *,
        input_name: str,
        input_dtype: str,
        profile: ShapeProfile,
        output_name: str = "output",
        output_dtype: str = "float32",
        output_shape: tuple[int, ...] = (-1,),
        device: str = "auto",
        mode: MemoryMode | str = MemoryMode.DYNAMIC,
        admission: Admission | None = None,
        admission_deadline_s: float = 5.0,
        use_cuda_graphs: bool = True,
        physical_source: PhysicalSource | None = None,
        reject_non_finite: bool = True,
        input_range: tuple[int, int] | None = None,
        context_plan: ContextPlan | None = None,
    ) -> None:
        super().__init__(name, mode=mode, admission=admission, admission_deadline_s=admission_deadline_s,
                         reject_non_finite=reject_non_finite)
        self._module_or_factory = module
        self._module: nn.Module | None = None
        self._profile = profile
        self._device_spec = device
        self._device: torch.device | None = None
        self._use_cuda_graphs = use_cuda_graphs
        self._physical_source = physical_source
        #: How context memory is obtained (``memory.mechanism``); None: planned at load from this host's facts.
        self._plan = context_plan
        self._buckets: dict[int, _Bucket] = {}
        #: ``_buckets`` by batch size, ascending: a call's bucket by bisection, not a sort.
        self._bucket_list: list[_Bucket] = []
        self._bucket_sizes: list[int] = []
        self._arena: VmmArena | None = None
        self._eager_bytes: dict[int, int] = {}
        self._per_sample_bytes = 0
        self._mech: ContextMechanism | None = None
        self._stream: torch.cuda.ExternalStream | None = None
        self._stream_handle = 0
        self._input = TensorSpec(input_name, input_dtype, (-1,) + tuple(profile.max[1:]), value_range=input_range)
        self._output = TensorSpec(output_name, output_dtype, (-1,) + tuple(output_shape))
        self._weights_bytes = 0
        # Weights tiers (backends/_tiers.py): _weights_store.VmmWeights on a GPU with VMM,
        # HostWeights on a CPU (made on the first page-out).
        self._weights = self._host_weights = None
        self._weights_updated = False
        #: Why the weights could not be put at stable addresses on this GPU (None: they are).
        self.stable_weights_error: str | None = None

    @classmethod
    def from_architecture(cls, name: str, arch: str, *, max_batch: int, opt_batch: int | None = None,
                          min_batch: int = 1, seed: int = 0, image_size: int = 224, seq_len: int = 128,
                          **kwargs: Any) -> PyTorchEngine:
        """A built-in (or torchvision) architecture with fixed random weights."""
        model = build(arch, seed=seed, image_size=image_size, seq_len=seq_len)
        opt = opt_batch or max_batch
        profile = ShapeProfile((min_batch, *model.sample_shape), (opt, *model.sample_shape),
                               (max_batch, *model.sample_shape))
        first = [model.module]

        def factory() -> nn.Module:
            # The module built above first; after an unload, built again (same seed, same weights).
            return first.pop() if first else build(arch, seed=seed, image_size=image_size, seq_len=seq_len).module

        return cls(name, factory, input_name=model.input_name, input_dtype=model.input_dtype,
                   profile=profile, output_name=model.output_name, output_shape=model.output_shape,
                   input_range=model.input_range, **kwargs)

    # -- description --------------------------------------------------------------

    def _module_cpu(self) -> nn.Module:
        if self._module is None:
            m = self._module_or_factory
            self._module = (m() if not isinstance(m, nn.Module) else m).eval()
            self._weights_bytes = sum(t.numel() * t.element_size()
                                      for t in list(self._module.parameters()) + list(self._module.buffers()))
        return self._module

    def _describe_impl(self) -> EngineDescription:
        self._module_cpu()
        return EngineDescription(
            name=self.name, inputs=(self._input,), outputs=(self._output,),
            profiles={self._input.name: self._profile}, weights_bytes=self._weights_bytes,
            backend="pytorch", platform=str(self._device or self._device_spec),
            extra={"mechanism": self._mechanism_impl().value},
        )

    def _mechanism_impl(self) -> ContextMechanism:
        if self._mech is not None:
            return self._mech
        if self._plan is not None:
            return self._plan.mechanism
        device = resolve_device(self._device_spec)
        return ContextMechanism.HOST_ACCOUNTING if device.type == "cpu" else ContextMechanism.VMM_ARENA

    def _context_bytes_impl(self, shapes: dict[str, tuple[int, ...]]) -> int:
        batch = batch_of(shapes)
        if self._buckets:
            return self._bucket_for(batch).context_bytes
        if self._eager_bytes:
            return self._eager_bytes[self._eager_bucket(batch)]
        if not self._per_sample_bytes:
            self._per_sample_bytes = _activation_bytes_per_sample(self._module_cpu(), self._input, self._profile)
        return self._per_sample_bytes * batch

    # -- loading ----------------------------------------------------------------

    def _load_impl(self) -> None:
        module = self._module_cpu()
        self._device = resolve_device(self._device_spec)
        if self._device.type == "cpu":
            self._mech = ContextMechanism.HOST_ACCOUNTING
            self._per_sample_bytes = _activation_bytes_per_sample(module, self._input, self._profile)
            return
        try:
            self._load_cuda(module)
        except BaseException:
            self._unload_cuda()
            raise

    def _load_cuda(self, module: nn.Module) -> None:
        index = self._device.index or 0
        torch.cuda.set_device(index)
        # Our own stream, not torch.cuda.Stream(): see _cuda.create_stream (saves ~70 MiB).
        self._stream_handle = _cuda.create_stream(index)
        self._stream = torch.cuda.ExternalStream(self._stream_handle, device=self._device)
        cuda_process.note_engine_loaded()
        self._module = self._place_weights(module, index)
        plan = self._plan or plan_context(ContextFacts(
            BackendKind.PYTORCH, index, vmm=_cuda.vmm_supported(index),
            graph_arena=self._use_cuda_graphs and _graph_alloc.load() is not None,
            pool_enabled=self._physical_source is not None))
        lib = _graph_alloc.load() if plan.vmm_arena else None
        if lib is None:
            self._mech = ContextMechanism.TORCH_EMPTY_CACHE
            self._measure_eager()
            return
        self._capture_graphs(lib, index)

    def _sample(self, batch: int) -> torch.Tensor:
        shape = (batch, *self._profile.opt[1:])
        dtype = _TORCH_DTYPES[self._input.dtype]
        if dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype, device=self._device)
        return torch.zeros(shape, dtype=dtype, device=self._device)

    def _warm_up(self, sizes: list[int]) -> dict[int, int]:
        """Run each bucket eagerly once (cuDNN picks algorithms, lazy modules load) and
        return its peak bytes. Each step is admitted first: its bytes, estimated from the
        bucket before, are held in the GPU's budget and waited for on the card, within the
        admission deadline, so a start on a crowded card waits or fails with the figures
        instead of running the card out of memory beside the calls of its neighbours."""
        index = self._device.index or 0
        base = torch.cuda.memory_allocated(self._device)
        peaks: dict[int, int] = {}
        prev_b, prev_peak = 0, 0
        for b in sizes:
            nbytes = warmup_estimate_bytes(prev_b, prev_peak, b, _WARMUP_FLOOR_BYTES)
            with admitted_transient(self.admission, nbytes, self.admission_deadline_s,
                                    free_bytes=lambda: _cuda.mem_get_info(index)[0], where=f"cuda:{index}"):
                torch.cuda.reset_peak_memory_stats(self._device)
                with torch.inference_mode(), torch.cuda.stream(self._stream):
                    self._module(self._sample(b))
                self._stream.synchronize()
                peaks[b] = torch.cuda.max_memory_allocated(self._device) - base
                # Give the step's cached blocks back inside the admission that covered them.
                torch.cuda.empty_cache()
            prev_b, prev_peak = b, peaks[b]
        return peaks

    def _measure_eager(self) -> None:
        self._eager_bytes.update(self._warm_up(batch_buckets(self._profile.min[0], self._profile.max[0])))

    # -- weights ----------------------------------------------------------------

    def _update_weights_impl(self, weights: dict[str, Any]) -> None:
        # Copied into the existing parameter and buffer tensors, never swapped for new
        # ones: captured CUDA graphs read the weights at fixed addresses, so they stay
        # valid and need no recapture. Everything is checked before the first copy, so
        # a refused update leaves the old weights whole.
        module = self._module_cpu()
        targets = module.state_dict(keep_vars=False)
        sources: dict[str, torch.Tensor] = {}
        mismatched = []
        for name, target in targets.items():
            if name not in weights:
                continue
            src = weights[name]
            src = src if isinstance(src, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(src))
            if tuple(src.shape) != tuple(target.shape):
                mismatched.append(f"{name}: {list(target.shape)} vs {list(src.shape)}")
            elif src.is_floating_point() != target.is_floating_point():
                mismatched.append(f"{name}: {target.dtype} vs {src.dtype}")
            else:
                sources[name] = src
        missing = sorted(set(targets) - set(weights))
        unexpected = sorted(set(weights) - set(targets))
        if missing or unexpected or mismatched:
            raise WeightsUpdateError(self.name, "the new weights do not match the model's",
                                     missing=missing, unexpected=unexpected, mismatched=mismatched)
        with torch.no_grad():
            if self._device is not None and self._device.type == "cuda":
                with torch.cuda.stream(self._stream):
                    for name, src in sources.items():
                        targets[name].copy_(src)
                self._stream.synchronize()
                self._weights_updated = True
            else:
                for name, src in sources.items():
                    targets[name].copy_(src)

    # -- running ----------------------------------------------------------------

    def _eager_bucket(self, batch: int) -> int:
        return min(b for b in self._eager_bytes if b >= batch)

    def _to_torch(self, value: Any) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            if value.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
                return torch.from_numpy(value.view(np.uint16)).view(torch.bfloat16)
            if not value.flags.writeable:
                # Ray hands out zero-copy, read-only arrays; the engine only reads its
                # inputs, so share the memory instead of copying (and skip torch's warning).
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.from_numpy(value)
            return torch.from_numpy(value)
        return value

    def _execute_impl(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                      mode: MemoryMode) -> dict[str, Any]:
        x = self._to_torch(inputs[self._input.name])
        batch = x.shape[0]
        if self._mech is ContextMechanism.HOST_ACCOUNTING:
            nbytes = self._per_sample_bytes * batch
            if mode is MemoryMode.DYNAMIC:
                with self.dynamic_context(nbytes, HostAccountingAllocator().allocate):
                    return {self._output.name: self._eager(x)}
            return {self._output.name: self._eager(x)}
        if self._buckets:
            bucket = self._bucket_for(batch)
            if mode is MemoryMode.DYNAMIC:
                with self.dynamic_context(bucket.context_bytes, bucket.allocate):
                    return {self._output.name: self._replay(bucket, x)}
            return {self._output.name: self._replay(bucket, x)}
        # Eager on the GPU without the arena.
        if mode is MemoryMode.DYNAMIC:
            nbytes = self._eager_bytes[self._eager_bucket(batch)]
            with self.dynamic_context(nbytes, self._empty_cache_block):
                return {self._output.name: self._eager(x)}
        return {self._output.name: self._eager(x)}

    def _after_caller(self, x: torch.Tensor) -> None:
        """A CUDA input may still be being written on the caller's stream: order after it."""
        if x.is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream(x.device))

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self._device.type == "cpu":
                return self._module(x)
            self._after_caller(x)
            with torch.cuda.stream(self._stream):
                out = self._module(x.to(self._device, non_blocking=True)).to("cpu")
            return out

    def mapping_counts(self) -> dict[str, int | bool] | None:
        arena = self._arena
        return None if arena is None else arena.mapping_counts()

    def _checks_finite_on_device(self) -> bool:
        return bool(self._buckets)

    def _empty_cache_block(self, nbytes: int) -> ContextBlock:
        def release(_block: ContextBlock) -> None:
            self._stream.synchronize()
            torch.cuda.empty_cache()

        return ContextBlock(0, nbytes, release)

    def _acquire_static_impl(self) -> ContextBlock | None:
        if self._buckets:
            # One physical backing, sized for the largest bucket, mapped into every window.
            return self._arena.allocate(max(b.context_bytes for b in self._buckets.values()),
                                        [b.offset for b in self._buckets.values()], standing=True)
        if self._eager_bytes:
            return ContextBlock(0, max(self._eager_bytes.values()), lambda b: None)
        if self._mech is ContextMechanism.HOST_ACCOUNTING:
            return ContextBlock(0, self._per_sample_bytes * self._profile.max[0], lambda b: None)
        return None

    def _close_impl(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            self._unload_cuda(restore=None)
        # On a CPU a host copy of paged-out weights is just dropped: closing must not make
        # tensors (close() runs from __del__ at interpreter exit, where that aborted).
        self._host_weights = None

    def _unload_cuda(self, restore: bool | None = True) -> None:
        """Free everything on the device. The module's tensors afterwards: CPU copies
        (``restore``), left as they were (``False``: the module is dropped), or CPU copies
        only if the weights were resident (``None``, closing: nothing made from a paged-out copy)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._release_graphs()
        if self._weights is not None:
            # Back to CPU tensors (from the device, or from the host copy when paged out).
            weights, self._weights = self._weights, None
            if restore or (restore is None and weights.resident):
                weights.detach_to_cpu()
            # Else the module's tensors stay views of the freed range: they own nothing, so
            # dropping them later frees nothing; the module is not used again.
            weights.close()
        elif self._module is not None:
            self._module = self._module.to("cpu")
        torch.cuda.synchronize(self._device)
        if self._stream_handle:
            self._stream = None
            _cuda.destroy_stream(self._device.index or 0, self._stream_handle)
            self._stream_handle = 0
        torch.cuda.empty_cache()


def _activation_bytes_per_sample(module: nn.Module, spec: TensorSpec, profile: ShapeProfile) -> int:
    """Sum of every leaf module's output for one sample: an upper bound on activations.

    Used on CPUs, where PyTorch's allocator holds host memory and no exact figure is
    available; measured once with forward hooks on a batch of one.
    """
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        sample = torch.zeros((1, *profile.opt[1:]), dtype=_TORCH_DTYPES[spec.dtype])
        t0 = time.perf_counter()
        with torch.inference_mode():
            module(sample)
        logger.debug("measured activations in %.0f ms", (time.perf_counter() - t0) * 1e3)
    except Exception as err:
        raise EngineLoadError(f"running the model on a sample of shape {list(sample.shape)} failed: {err}") from err
    finally:
        for h in handles:
            h.remove()
    return total
