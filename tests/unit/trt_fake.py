"""A stand-in for the TensorRT runtime API and for CUDA, recording every call in order.

It follows TensorRT's documented contract for what the backend uses (``Runtime``,
``ICudaEngine``, ``IExecutionContext`` with its allocation strategies) and refuses
what the contract forbids: a ``USER_MANAGED`` context enqueued without device memory
set, or with less than ``update_device_memory_size_for_shapes()`` said. The "GPU"
computes ``output[:, j] = scale * (input[:, 2j] + input[:, 2j+1])`` (input ``(batch, 4)``,
output ``(batch, 2)``: an output shape of its own, so a backend that sized outputs like
inputs fails) over tensors found by their data pointer, where ``scale`` (2 at first) is
the engine's one refittable weight: a ``Refitter`` changes it when the world's engine
is built refittable, ``serialize()`` writes it into the plan and deserialising a
plan sets it from there (2 for the original plan).

Execution is asynchronous, as on a GPU: ``execute_async_v3`` only queues the work on
its stream; it runs when the stream is synchronised (or a copy on that stream waits
for it). Releasing context memory, destroying the stream, or freeing an I/O tensor
while work that uses it is queued raises ``StreamRaceError`` (on a GPU: silent
corruption), so a backend that releases before it synchronises is caught.
"""

from __future__ import annotations

import contextlib
import enum
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine_runtime.memory import ContextBlock, ContextMechanism

GOOD_PLAN = b"FAKEPLAN-v1"
#: Bytes of context memory per sample in the batch; the profile maximum is 8 samples.
PER_SAMPLE_BYTES = 1000
MAX_BATCH = 8
WEIGHTS_BYTES = 4096
ARENA_BASE = 0x7F00_0000_0000
IN_FEATURES = 4
OUT_FEATURES = 2


class StreamRaceError(RuntimeError):
    """Memory or a stream given up while queued work still uses it."""


def expected(x: np.ndarray, scale: float = 2.0) -> np.ndarray:
    """What the fake engine computes for input ``x``."""
    return (scale * (x[:, 0::2] + x[:, 1::2])).astype(x.dtype)


class Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT64 = 2
    FP8 = 3


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class EngineStat(enum.Enum):
    TOTAL_WEIGHTS_SIZE = 0


class EngineValidity(enum.Enum):
    VALID = 0
    SUBOPTIMAL = 1
    INVALID = 2


class EngineInvalidityDiagnostics(enum.IntFlag):
    VERSION_MISMATCH = 1
    UNSUPPORTED_CC = 2
    MALFORMED_ENGINE = 4


@dataclass
class World:
    """Everything the fake saw, in order, and what is alive."""

    events: list[tuple] = field(default_factory=list)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    contexts: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    output_dtype: DataType = DataType.FLOAT
    fail_enqueue: bool = False
    fail_static_context: bool = False
    #: Whether the plan was built with the REFIT flag.
    refittable: bool = False
    #: The engine's one weight ("scale"): output = scale * pairwise sums of the input.
    scale: float = 2.0
    #: Work queued per stream handle and not yet run: (context memory range or None, fn).
    pending: dict[int, list[tuple[tuple[int, int] | None, Any]]] = field(default_factory=dict)
    #: Streams created and not destroyed, by handle.
    live_streams: set[int] = field(default_factory=set)

    def run_pending(self, handle: int) -> None:
        for _, work in self.pending.pop(handle, []):
            work()

    def queued_on_memory(self, ptr: int) -> bool:
        return any(mem is not None and mem[0] <= ptr < mem[0] + max(mem[1], 1)
                   for works in self.pending.values() for mem, _ in works)

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    def live_strategies(self) -> list[str]:
        return sorted(c.strategy.name for c in self.contexts)


def make_module(world: World, *, with_validity: bool = True) -> types.ModuleType:
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.99.0-fake"
    for cls in (ILogger, DataType, TensorIOMode, ExecutionContextAllocationStrategy, EngineStat,
                EngineValidity, EngineInvalidityDiagnostics):
        setattr(mod, cls.__name__, cls)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            world.events.append(("runtime",))

        def deserialize_cuda_engine(self, plan: bytes) -> Any:
            world.events.append(("deserialize", len(plan)))
            plan, _, weight = bytes(plan).partition(b"|scale=")
            if plan != GOOD_PLAN:
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                "(Serialization assertion header.magicTag == kEXPECTED_MAGIC_TAG failed)")
                return None
            # A plan carries its weight: the original's, or a refitted engine's serialize().
            world.scale = float(weight) if weight else 2.0
            return Engine()

    if with_validity:
        def get_engine_validity(self, plan: bytes) -> tuple[EngineValidity, int]:
            world.events.append(("validity",))
            if plan.startswith(b"OTHERGPU"):
                self.logger.log(Severity.ERROR, "The engine cannot run on this GPU, which has compute capability 9.0")
                return EngineValidity.INVALID, int(EngineInvalidityDiagnostics.UNSUPPORTED_CC)
            return EngineValidity.VALID, 0

        Runtime.get_engine_validity = get_engine_validity

    class Engine:
        num_io_tensors = 2
        num_optimization_profiles = 1

        @property
        def refittable(self) -> bool:
            return world.refittable
        device_memory_size_v2 = MAX_BATCH * PER_SAMPLE_BYTES

        def get_tensor_name(self, i: int) -> str:
            return ("input", "output")[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType.FLOAT if name == "input" else world.output_dtype

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, IN_FEATURES) if name == "input" else (-1, OUT_FEATURES)

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [(1, IN_FEATURES), (4, IN_FEATURES), (MAX_BATCH, IN_FEATURES)]

        def get_engine_stat(self, stat: EngineStat) -> int:
            return WEIGHTS_BYTES

        def serialize(self) -> bytes:
            world.events.append(("serialize",))
            return GOOD_PLAN + f"|scale={world.scale!r}".encode()

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> Any:
            world.events.append(("create_context", strategy.name))
            if strategy is ExecutionContextAllocationStrategy.STATIC and world.fail_static_context:
                return None
            ctx = Context(strategy)
            world.contexts.add(ctx)
            return ctx

    class Context:
        def __init__(self, strategy: ExecutionContextAllocationStrategy) -> None:
            self.strategy = strategy
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self.memory: tuple[int, int] | None = None

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            world.events.append(("set_input_shape", name, tuple(shape)))
            if not 1 <= shape[0] <= MAX_BATCH:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def update_device_memory_size_for_shapes(self) -> int:
            n = self.shapes["input"][0] * PER_SAMPLE_BYTES
            world.events.append(("update_device_memory_size_for_shapes", n))
            return n

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            batch = self.shapes["input"][0]
            return self.shapes["input"] if name == "input" else (batch, OUT_FEATURES)

        def set_device_memory(self, ptr: int, size: int) -> None:
            world.events.append(("set_device_memory", ptr, size))
            if self.strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:
                raise RuntimeError("set_device_memory on a context that allocates its own memory")
            self.memory = (ptr, size)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            world.events.append(("set_tensor_address", name))
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            world.events.append(("execute_async_v3", stream))
            if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED:
                need = self.shapes["input"][0] * PER_SAMPLE_BYTES
                if self.memory is None or self.memory[1] < need:
                    raise RuntimeError(f"USER_MANAGED context enqueued with memory {self.memory}, needs {need}")
            if world.fail_enqueue:
                return False
            src, dst = world.tensors[self.addresses["input"]], world.tensors[self.addresses["output"]]
            want = self.get_tensor_shape("output")
            if tuple(dst.shape) != tuple(want):
                raise RuntimeError(f"output bound with shape {tuple(dst.shape)}, the engine writes {want}")
            memory = self.memory if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED else None
            scale = world.scale

            def work() -> None:
                dst.copy_(scale * (src[:, 0::2] + src[:, 1::2]))
                world.events.append(("work_done", stream))

            world.pending.setdefault(stream, []).append((memory, work))
            return True

    class Weights:
        def __init__(self, array: Any) -> None:
            self.array = np.asarray(array)

    class Refitter:
        """Refits the engine's one weight, ``scale``: a float32 array of one element."""

        def __init__(self, engine: Any, logger: Any) -> None:
            world.events.append(("refitter",))
            if not world.refittable:
                raise TypeError("Refitter: the engine is not refittable")
            self.logger = logger
            self.pending: dict[str, np.ndarray] = {}

        def get_all_weights(self) -> list[str]:
            return ["scale"]

        def set_named_weights(self, name: str, weights: Weights) -> bool:
            world.events.append(("set_named_weights", name))
            if name != "scale" or weights.array.size != 1 or weights.array.dtype != np.float32:
                self.logger.log(Severity.ERROR, f"IRefitter::setNamedWeights: Error Code 3: weights {name!r} "
                                f"of {weights.array.size} {weights.array.dtype} elements do not match")
                return False
            self.pending[name] = weights.array
            return True

        def get_missing_weights(self) -> list[str]:
            return [n for n in self.get_all_weights() if n not in self.pending]

        def refit_cuda_engine(self) -> bool:
            world.events.append(("refit_cuda_engine",))
            if self.get_missing_weights():
                return False
            world.scale = float(self.pending["scale"].reshape(-1)[0])
            return True

    mod.Runtime = Runtime
    mod.Weights = Weights
    mod.Refitter = Refitter
    return mod


class FakeStream:
    handle = 0xC0FFEE  # non-zero: 0 is CUDA's legacy default stream


class FakeAllocator:
    mechanism = ContextMechanism.VMM_ARENA

    def __init__(self, world: World, max_bytes: int) -> None:
        self.world = world
        self.max_bytes = max_bytes
        self.outstanding = 0
        self.closed = False

    def allocate(self, nbytes: int) -> ContextBlock:
        self.world.events.append(("acquire", nbytes))
        self.outstanding += 1
        return ContextBlock(ARENA_BASE, nbytes, self._release)

    def _release(self, block: ContextBlock) -> None:
        if self.world.queued_on_memory(block.ptr):
            raise StreamRaceError(f"context memory at 0x{block.ptr:x} released while queued work uses it")
        self.world.events.append(("release", block.nbytes))
        self.outstanding -= 1

    def close(self) -> None:
        self.world.events.append(("allocator_close",))
        self.closed = True


class FakeDevice:
    """``CudaDevice``'s interface over CPU tensors."""

    index = 0

    def __init__(self, world: World, available: bool = True) -> None:
        self.world = world
        self._available = available
        self.allocators: list[FakeAllocator] = []
        self.streams: list[FakeStream] = []

    def available(self) -> bool:
        return self._available

    def scope(self):
        return contextlib.nullcontext()

    def new_stream(self) -> FakeStream:
        self.world.events.append(("new_stream",))
        stream = FakeStream()
        self.streams.append(stream)
        self.world.live_streams.add(stream.handle)
        return stream

    def stream_handle(self, stream: FakeStream) -> int:
        return stream.handle

    def synchronize(self, stream: FakeStream) -> None:
        self.world.run_pending(stream.handle)
        self.world.events.append(("synchronize", stream.handle))

    def destroy_stream(self, stream: FakeStream) -> None:
        if self.world.pending.get(stream.handle):
            raise StreamRaceError("stream destroyed with work queued on it")
        self.world.events.append(("destroy_stream", stream.handle))
        self.world.live_streams.discard(stream.handle)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        self.world.tensors[t.data_ptr()] = t
        return t

    def to_device(self, value: Any, stream: FakeStream) -> torch.Tensor:
        t = torch.from_numpy(value.copy()) if not isinstance(value, torch.Tensor) else value.clone()
        return self._keep(t.contiguous())

    def empty(self, shape: tuple[int, ...], dtype: str, stream: FakeStream) -> torch.Tensor:
        return self._keep(torch.zeros(shape, dtype=getattr(torch, dtype)))

    def to_host(self, tensor: torch.Tensor, stream: FakeStream) -> torch.Tensor:
        # A copy on the stream waits for the work queued before it, as on a GPU.
        self.world.run_pending(stream.handle)
        return tensor.clone()

    def is_device_tensor(self, value: Any) -> bool:
        return False

    def data_ptr(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr()

    def allocator(self, max_bytes: int, deadline_s: float) -> FakeAllocator:
        self.world.events.append(("allocator", max_bytes))
        a = FakeAllocator(self.world, max_bytes)
        self.allocators.append(a)
        return a

    def free_bytes(self) -> int:
        return 123 * 2**20
