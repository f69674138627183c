"""When an engine holds its context memory (``MemoryMode``) and how it is obtained
(``ContextMechanism``): the two enums every layer speaks, mapped onto library calls
only in the backends."""

from __future__ import annotations

import enum


class MemoryMode(str, enum.Enum):
    """When an engine holds its execution-context memory."""

    #: Held between calls: fastest, largest.
    STATIC = "static"
    #: Held only while a call runs, returned to the driver afterwards.
    DYNAMIC = "dynamic"

    @classmethod
    def parse(cls, value: MemoryMode | str) -> MemoryMode:
        if isinstance(value, MemoryMode):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown memory mode {value!r}; expected one of {[m.value for m in cls]}") from None


class ContextMechanism(str, enum.Enum):
    """How context memory is obtained; the status view reports it per replica."""

    #: No device: bytes are accounted (for the budget and the coordinator), host memory is PyTorch's.
    HOST_ACCOUNTING = "host-accounting"
    #: ``cudaMalloc``/``cudaFree`` per acquisition: simple, returns memory to the driver.
    CUDA_MALLOC = "cuda-malloc"
    #: Eager PyTorch, ``torch.cuda.empty_cache()`` after each dynamic call (fallback without the arena).
    TORCH_EMPTY_CACHE = "torch-empty-cache"
    #: A stable virtual range whose physical memory is created and mapped per call (CUDA VMM).
    VMM_ARENA = "vmm-arena"
    #: Like ``VMM_ARENA`` but the physical memory is leased from the GPU's shared pool.
    VMM_POOL = "vmm-pool"
