"""The TensorRT backend: serialized plans run with context memory held always or per call.

STATIC runs on an execution context created with TensorRT's default allocation
strategy: TensorRT allocates the context memory for the profile's maximum shapes
and keeps it until the context is destroyed (on a switch to DYNAMIC or on close).

DYNAMIC runs on a ``USER_MANAGED`` context that owns no activation memory. Each call:
set the input shapes, ask ``update_device_memory_size_for_shapes()`` for the exact
bytes these shapes need (not the profile maximum), acquire that much through
``BaseEngine.dynamic_context`` (a stable-address VMM arena where the GPU supports it,
its physical memory leased from the GPU's pool when a ``physical_source`` is given,
``cudaMalloc`` otherwise), ``set_device_memory``, bind I/O, ``execute_async_v3`` on
this engine's own (non-default) stream, synchronise that stream, then release. Nothing
is held between calls.

Works with ``tensorrt`` and ``tensorrt_rtx`` alike (see ``engine_runtime.backends._trt``).
Everything touching CUDA goes through a :class:`CudaDevice`, which tests replace.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from engine_runtime.backends import _trt
from engine_runtime.memory.admission import Admission
from engine_runtime.memory.arena import PhysicalSource
from engine_runtime.backends._tiers import TensorRTTiers
from engine_runtime.engine import BaseEngine
from engine_runtime.errors import (
    ContextMemoryUnavailable,
    EbbInternalError,
    EngineLoadError,
    InputShapeError,
    PlanIncompatibleError,
    WeightsUpdateError,
)
from engine_runtime.memory import (
    ContextAllocator,
    ContextBlock,
    ContextMechanism,
    CudaMallocAllocator,
    MemoryMode,
)
from engine_runtime.memory.mechanism import BackendKind, ContextFacts, ContextPlan, plan_context
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


class CudaDevice:
    """Streams, I/O buffers and context-memory allocators on one CUDA device.

    The seam between the backend and CUDA: the backend decides *what* happens and in
    which order, this class does it (through torch and ``engine_runtime._cuda``).
    I/O buffers are torch CUDA tensors; they are not context memory and live in
    PyTorch's caching allocator like any request tensor.
    """

    def __init__(self, index: int = 0, context_plan: ContextPlan | None = None) -> None:
        self.index = index
        #: How context memory is obtained (``memory.mechanism``); None: planned from this device's facts.
        self.context_plan = context_plan

    def available(self) -> bool:
        from engine_runtime import _cuda

        return _cuda.available()

    def scope(self):
        """Make this device current (TensorRT deserialises onto the current device)."""
        from engine_runtime import _cuda

        return _cuda.device(self.index)

    def new_stream(self) -> Any:
        import torch

        from engine_runtime import _cuda

        # A stream of our own: execute_async_v3 on the legacy default stream would
        # serialise with every other kernel in the process and costs TensorRT an
        # extra synchronisation. Not torch.cuda.Stream(): its pool of 64 streams costs
        # ~70 MiB of device memory per process (see _cuda.create_stream).
        return torch.cuda.ExternalStream(_cuda.create_stream(self.index), device=self.index)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def destroy_stream(self, stream: Any) -> None:
        """Destroy a stream made by :meth:`new_stream` (after its work has finished)."""
        from engine_runtime import _cuda

        _cuda.destroy_stream(self.index, int(stream.cuda_stream))

    def to_device(self, value: Any, stream: Any) -> Any:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        with torch.cuda.stream(stream):
            return tensor.to(f"cuda:{self.index}", non_blocking=True).contiguous()

    def empty(self, shape: tuple[int, ...], dtype: str, stream: Any) -> Any:
        import torch

        with torch.cuda.stream(stream):
            return torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{self.index}")

    def to_host(self, tensor: Any, stream: Any) -> Any:
        import torch

        with torch.cuda.stream(stream):
            return tensor.to("cpu", non_blocking=False)

    def is_device_tensor(self, value: Any) -> bool:
        return bool(getattr(value, "is_cuda", False))

    def data_ptr(self, tensor: Any) -> int:
        return int(tensor.data_ptr())

    def allocator(self, max_bytes: int, deadline_s: float, source: PhysicalSource | None = None) -> ContextAllocator:
        """A stable-address arena sized for the largest shapes where the plan says VMM, else cudaMalloc.

        The arena's physical memory comes from ``source`` (the GPU's pool) where one is given.
        """
        from engine_runtime import _cuda

        plan = self.context_plan or plan_context(ContextFacts(
            BackendKind.TENSORRT, self.index, vmm=_cuda.vmm_supported(self.index), pool_enabled=source is not None))
        if plan.vmm_arena:
            from engine_runtime.memory.arena import VmmArena

            return VmmArena(self.index, max_bytes, source, deadline_s=deadline_s)
        return CudaMallocAllocator(self.index)

    def free_bytes(self) -> int:
        from engine_runtime import _cuda

        return _cuda.mem_get_info(self.index)[0]


class TensorRTEngine(TensorRTTiers, BaseEngine):
    """A TensorRT plan behind Ebb's engine interface.

    Lazy: the constructor only reads (or keeps) the plan bytes. ``describe()`` needs
    the plan's tensor names, dtypes and profiles, which only the deserialised engine
    knows, so the first ``describe()`` deserialises the plan (weights go to the GPU
    then); pass ``description=`` (e.g. from the build cache's metadata) to avoid that.
    Execution contexts, the stream and the context-memory allocator are created by
    ``warm()`` or the first call.
    """

    def __init__(
        self,
        name: str,
        plan: str | os.PathLike[str] | bytes,
        *,
        mode: MemoryMode | str = MemoryMode.DYNAMIC,
        device: CudaDevice | int = 0,
        admission: Admission | None = None,
        admission_deadline_s: float = 5.0,
        reject_non_finite: bool = True,
        description: EngineDescription | None = None,
        physical_source: PhysicalSource | None = None,
        context_plan: ContextPlan | None = None,
    ) -> None:
        super().__init__(name, mode=mode, admission=admission, admission_deadline_s=admission_deadline_s,
                         reject_non_finite=reject_non_finite)
        if isinstance(plan, (bytes, bytearray, memoryview)):
            self._plan: bytes | None = bytes(plan)
            self._plan_path: Path | None = None
        else:
            self._plan = None
            self._plan_path = Path(plan)
        self._device = CudaDevice(device, context_plan) if isinstance(device, int) else device
        self._description = description
        self._plan_lock = threading.Lock()
        self._trt: _trt.TensorRT | None = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._plan_nbytes = 0
        self._static_ctx: Any = None
        self._dynamic_ctx: Any = None
        self._stream: Any = None
        self._allocator: ContextAllocator | None = None
        self._physical_source = physical_source
        self._refitted = False

    # -- plan and engine ----------------------------------------------------------

    def _source(self) -> str:
        return str(self._plan_path) if self._plan_path is not None else f"<{len(self._plan or b'')} bytes>"

    def _read_plan(self) -> bytes:
        if self._plan is not None:
            return self._plan
        try:
            return self._plan_path.read_bytes()
        except OSError as err:
            raise EngineLoadError(f"engine {self.name!r}: cannot read plan {self._plan_path}: {err}") from err

    def _deserialized(self) -> Any:
        """The ``ICudaEngine``, deserialised once; ``PlanIncompatibleError`` leaves nothing behind."""
        if self._engine is not None:
            return self._engine
        # Not BaseEngine's _init_lock: _ensure_loaded holds that while calling _load_impl.
        with self._plan_lock:
            if self._engine is not None:
                return self._engine
            self._check_open()
            trt = _trt.load()
            plan = self._read_plan()
            if not self._device.available():
                raise EngineLoadError(
                    f"engine {self.name!r}: cannot deserialise TensorRT plan {self._source()} "
                    f"({len(plan)} bytes): no CUDA device is visible in this process; TensorRT "
                    f"engines run only on a GPU (build them anywhere with `python -m engine_runtime.build`)"
                )
            log = _trt.make_logger(trt)
            runtime = engine = None
            try:
                with self._device.scope():
                    runtime = trt.module.Runtime(log)
                    if runtime is None:
                        raise EngineLoadError(f"engine {self.name!r}: TensorRT could not create a runtime: "
                                              + _join(log.take_errors()))
                    self._check_validity(trt, runtime, plan, log)
                    engine = runtime.deserialize_cuda_engine(plan)
                if engine is None:
                    raise PlanIncompatibleError(
                        f"engine {self.name!r}: {trt.flavour} {trt.version} refused plan {self._source()} "
                        f"({len(plan)} bytes; corrupt, or built for another GPU or TensorRT version): "
                        + _join(log.take_errors())
                    )
            except BaseException:
                # Drop references in reverse order of creation so TensorRT frees
                # whatever the failed attempt allocated before we return.
                del engine, runtime
                raise
            self._trt, self._logger, self._runtime, self._engine = trt, log, runtime, engine
            self._plan_nbytes = len(plan)
            logger.info("engine %s: deserialised %s (%.1f MiB) with %s", self.name, self._source(),
                        len(plan) / MiB, trt.tag)
            return engine

    def _check_validity(self, trt: _trt.TensorRT, runtime: Any, plan: bytes, log: Any) -> None:
        """Ask TensorRT whether the plan fits this GPU before deserialising, where it can say."""
        check = getattr(runtime, "get_engine_validity", None)
        if check is None:  # full TensorRT 10.x has no validity query; deserialisation will tell
            return
        validity, diagnostics = check(plan)
        if getattr(validity, "name", str(validity)) != "INVALID":
            return
        flags = trt.module.EngineInvalidityDiagnostics
        reasons = [m for m, v in flags.__members__.items() if int(diagnostics) & int(v)]
        raise PlanIncompatibleError(
            f"engine {self.name!r}: {trt.flavour} {trt.version} says plan {self._source()} cannot run here "
            f"(diagnostics: {reasons or 'none given'}): " + _join(log.take_errors())
        )

    # -- description --------------------------------------------------------------

    def _describe_impl(self) -> EngineDescription:
        if self._description is None:
            self._description = self._describe_engine(self._deserialized())
        return self._description

    def _describe_engine(self, engine: Any) -> EngineDescription:
        trt = self._trt
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        profiles: dict[str, ShapeProfile] = {}
        is_input = trt.module.TensorIOMode.INPUT
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            spec = TensorSpec(tname, _trt.numpy_name(engine.get_tensor_dtype(tname)),
                              tuple(int(d) for d in engine.get_tensor_shape(tname)))
            if engine.get_tensor_mode(tname) == is_input:
                inputs.append(spec)
                lo, opt, hi = engine.get_tensor_profile_shape(tname, 0)
                profiles[tname] = ShapeProfile(_dims(lo), _dims(opt), _dims(hi))
            else:
                outputs.append(spec)
        weights, source = self._weights_bytes(engine)
        return EngineDescription(
            name=self.name, inputs=tuple(inputs), outputs=tuple(outputs), profiles=profiles,
            weights_bytes=weights, backend=trt.flavour, platform=f"cuda:{self._device.index}",
            extra={"tensorrt": trt.tag, "weights_bytes_source": source, "plan_bytes": self._plan_nbytes,
                   "max_context_bytes": int(engine.device_memory_size_v2),
                   "optimization_profiles": int(engine.num_optimization_profiles)},
        )

    def _weights_bytes(self, engine: Any) -> tuple[int, str]:
        stat = getattr(self._trt.module, "EngineStat", None)
        if stat is not None and hasattr(engine, "get_engine_stat"):
            n = int(engine.get_engine_stat(stat.TOTAL_WEIGHTS_SIZE))
            if n >= 0:
                return n, "engine-stat"
        # Without the stat the plan size is the honest upper bound: weights plus kernels.
        return self._plan_nbytes, "plan-size"

    def _mechanism_impl(self) -> ContextMechanism:
        if self._allocator is not None:
            return self._allocator.mechanism
        return ContextMechanism.CUDA_MALLOC

    def _context_bytes_impl(self, shapes: dict[str, tuple[int, ...]]) -> int:
        # TensorRT answers only through a context with the shapes set: before warm() this
        # creates the USER_MANAGED context (it holds no activation memory).
        self._deserialized()
        with self._call_lock:
            ctx = self._static_ctx if self._static_ctx is not None else self._user_managed_context()
            self._set_shapes(ctx, shapes)
            return int(ctx.update_device_memory_size_for_shapes())

    # -- loading ----------------------------------------------------------------

    def _load_impl(self) -> None:
        engine = self._deserialized()
        try:
            with self._device.scope():
                self._stream = self._device.new_stream()
                # The source goes only where one is given: a device's allocator() need not take it.
                source = {} if self._physical_source is None else {"source": self._physical_source}
                self._allocator = self._device.allocator(int(engine.device_memory_size_v2),
                                                         self.admission_deadline_s, **source)
        except BaseException:
            self._close_impl()
            raise
        logger.info("engine %s: ready, context memory up to %.1f MiB via %s", self.name,
                    engine.device_memory_size_v2 / MiB, self._allocator.mechanism.value)

    def _user_managed_context(self) -> Any:
        if self._dynamic_ctx is None:
            strategy = self._trt.module.ExecutionContextAllocationStrategy.USER_MANAGED
            with self._device.scope():
                ctx = self._engine.create_execution_context(strategy)
            if ctx is None:
                raise EngineLoadError(f"engine {self.name!r}: TensorRT could not create a USER_MANAGED "
                                      f"execution context: " + _join(self._logger.take_errors()))
            self._dynamic_ctx = ctx
            logger.debug("engine %s: created USER_MANAGED execution context", self.name)
        return self._dynamic_ctx

    def _acquire_static_impl(self) -> ContextBlock | None:
        # BaseEngine holds the call lock here: no call is in flight on either context.
        nbytes = int(self._engine.device_memory_size_v2)
        with self._device.scope():
            ctx = self._engine.create_execution_context()  # TensorRT's default: STATIC
        if ctx is None:
            raise ContextMemoryUnavailable(nbytes, self._device.free_bytes(), where=f"cuda:{self._device.index}")
        self._static_ctx = ctx
        # The USER_MANAGED context is idle in static mode; drop it rather than keep two.
        self._dynamic_ctx = None
        # TensorRT owns this memory; the block only accounts for it.
        return ContextBlock(0, nbytes, lambda block: None)

    def _release_static_impl(self, block: ContextBlock | None) -> None:
        # Destroying the context is what gives its memory back to the GPU.
        self._static_ctx = None

    def _close_impl(self) -> None:
        # Each step in its own finally: a failing one must not skip the others (the
        # stream was leaked before: created per engine and never destroyed).
        try:
            if self._stream is not None:
                stream = self._stream
                try:
                    self._device.synchronize(stream)
                finally:
                    self._stream = None
                    self._device.destroy_stream(stream)
        finally:
            # Contexts before the memory they may still point at.
            self._static_ctx = None
            self._dynamic_ctx = None
            try:
                if self._allocator is not None:
                    allocator, self._allocator = self._allocator, None
                    allocator.close()
            finally:
                # Reverse order of creation: the engine before the runtime that made it.
                self._engine = None
                self._runtime = None

    # -- weights ----------------------------------------------------------------

    def _update_weights_impl(self, weights: dict[str, Any]) -> None:
        """Refit: new values for every refittable weight, written into the engine in place.

        Only plans built with the REFIT builder flag can be refitted (``ebb build
        --refittable``); TensorRT checks each weight's size and type as it is set, and
        nothing reaches the engine before every weight was accepted. Execution contexts
        survive a refit, so both modes keep their contexts.
        """
        engine = self._deserialized()
        if not getattr(engine, "refittable", False):
            raise WeightsUpdateError(self.name, f"plan {self._source()} was not built refittable; rebuild it "
                                     f"with the REFIT builder flag (ebb build --refittable)")
        refitter = self._trt.module.Refitter(engine, self._logger)
        known = set(refitter.get_all_weights())
        missing = sorted(known - set(weights))
        unexpected = sorted(set(weights) - known)
        if missing or unexpected:
            raise WeightsUpdateError(self.name, "the names must be the engine's refittable weights",
                                     missing=missing, unexpected=unexpected)
        # TensorRT reads the host arrays during refit_cuda_engine(): keep them alive until then.
        arrays = {name: _host_array(value) for name, value in weights.items()}
        mismatched = [f"{name}: {_join(self._logger.take_errors())}" for name, array in arrays.items()
                      if not refitter.set_named_weights(name, self._trt.module.Weights(array))]
        if mismatched:
            raise WeightsUpdateError(self.name, "TensorRT refused weights", mismatched=mismatched)
        still = list(refitter.get_missing_weights())
        if still:
            raise WeightsUpdateError(self.name, "TensorRT needs more weights for this refit", missing=still)
        if self._stream is not None:
            self._device.synchronize(self._stream)
        with self._device.scope():
            ok = refitter.refit_cuda_engine()
        if not ok:
            raise WeightsUpdateError(self.name, "refit_cuda_engine failed: " + _join(self._logger.take_errors()))
        self._refitted = True
        del arrays

    # -- running ----------------------------------------------------------------

    def _set_shapes(self, ctx: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        for tname, shape in shapes.items():
            if not ctx.set_input_shape(tname, shape):
                profile = self.describe().profiles[tname]
                raise InputShapeError(tname, profile.describe(), shape,
                                      "TensorRT refused it: " + _join(self._logger.take_errors()))

    def mapping_counts(self) -> dict[str, int | bool] | None:
        counts = getattr(self._allocator, "mapping_counts", None)
        return None if counts is None else counts()

    def _allocate_dynamic(self, nbytes: int) -> ContextBlock:
        """The call's context memory, waiting no longer than what is left of its deadline."""
        from engine_runtime.memory.arena import VmmArena

        if isinstance(self._allocator, VmmArena):
            return self._allocator.allocate(nbytes, deadline_s=self.call_deadline_s)
        return self._allocator.allocate(nbytes)

    def _execute_impl(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                      mode: MemoryMode) -> dict[str, Any]:
        desc = self.describe()
        ctx = self._static_ctx if mode is MemoryMode.STATIC else self._user_managed_context()
        if ctx is None:
            raise EbbInternalError(f"engine {self.name!r}: no execution context for mode {mode.value}")
        stream = self._stream
        keep_on_device = all(self._device.is_device_tensor(v) for v in inputs.values())
        self._set_shapes(ctx, shapes)
        bound = {spec.name: self._device.to_device(inputs[spec.name], stream) for spec in desc.inputs}
        for spec in desc.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineLoadError(f"engine {self.name!r}: output {spec.name!r} has a data-dependent shape "
                                      f"{list(shape)}; Ebb serves only outputs whose shape follows from the inputs")
            bound[spec.name] = self._device.empty(shape, spec.dtype, stream)
        if mode is MemoryMode.DYNAMIC:
            nbytes = int(ctx.update_device_memory_size_for_shapes())
            with self.dynamic_context(nbytes, self._allocate_dynamic) as block:
                try:
                    if nbytes:
                        ctx.set_device_memory(block.ptr, nbytes)
                    self._run(ctx, bound, stream)
                finally:
                    # The with-block must not end (and release the memory) while the GPU
                    # may still be using it, even when enqueueing failed half-way.
                    self._device.synchronize(stream)
        else:
            try:
                self._run(ctx, bound, stream)
            finally:
                self._device.synchronize(stream)
        outputs = {spec.name: bound[spec.name] for spec in desc.outputs}
        if keep_on_device:
            return outputs
        return {k: self._device.to_host(v, stream) for k, v in outputs.items()}

    def _run(self, ctx: Any, bound: dict[str, Any], stream: Any) -> None:
        for tname, tensor in bound.items():
            if not ctx.set_tensor_address(tname, self._device.data_ptr(tensor)):
                raise EbbInternalError(f"engine {self.name!r}: set_tensor_address({tname!r}) failed: "
                                       + _join(self._logger.take_errors()))
        if not ctx.execute_async_v3(self._device.stream_handle(stream)):
            raise EbbInternalError(f"engine {self.name!r}: execute_async_v3 failed: "
                                   + _join(self._logger.take_errors()))


def _host_array(value: Any) -> np.ndarray:
    """A contiguous host numpy array of ``value`` (numpy or a torch tensor, on any device)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def _join(messages: list[str]) -> str:
    return " | ".join(messages) if messages else "TensorRT logged no error"

