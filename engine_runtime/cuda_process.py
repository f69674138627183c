"""Per-process CUDA settings: the stack limit, and the process's measured memory floor.

A process that has initialised CUDA holds a few hundred MiB on the card before any
model; most of it scales with the per-thread stack limit (reserved for every thread
the GPU can run). Lowering the limit to 256 bytes right after CUDA initialises saved
198 MiB per process on an H200 and left ResNet-50's outputs bit-identical; lowering it
*after* CUDA graphs were captured made the next replay fail ("unspecified launch
failure"; ``shared/reference/gpu-measurements.md``). So the limit is set first thing
in a replica process, and refused once anything in the process has captured a graph:
the backends call :func:`note_graphs_captured` in their capture path.

``process_floor_bytes`` is this process's NVML memory measured right after CUDA
initialised and the limit was set, before any engine loaded: what the status view
reports as the replica's floor, and what a group's memory is checked against.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from engine_runtime.errors import StackLimitError

logger = logging.getLogger(__name__)

#: The default for replica processes, from measurement (H200: 198 MiB saved per process,
#: ResNet-50 outputs bit-identical; the driver raises the limit again for a kernel that
#: needs more stack).
DEFAULT_STACK_LIMIT_BYTES = 256

_lock = threading.Lock()
_graphs_captured = 0
_engines_loaded = 0
_floor_bytes: int | None = None
_floor_measured = False


def note_graphs_captured(count: int = 1) -> None:
    """A backend captured CUDA graphs in this process: the stack limit is frozen from now on."""
    global _graphs_captured
    with _lock:
        _graphs_captured += int(count)


def graphs_captured() -> int:
    """How many CUDA graphs were captured in this process (as the backends reported them)."""
    return _graphs_captured


def note_engine_loaded() -> None:
    """An engine put something on a GPU: a floor measured from now on would include it."""
    global _engines_loaded
    with _lock:
        _engines_loaded += 1


def _limit_enum(rt: Any) -> Any:
    return rt.cudaLimit.cudaLimitStackSize


def get_cuda_stack_limit(device: int = 0) -> int:
    """The per-thread stack limit (bytes) on ``device``'s primary context."""
    from engine_runtime import _cuda

    rt = _cuda.runtime()
    with _cuda.device(device):
        err, value = rt.cudaDeviceGetLimit(_limit_enum(rt))
    _cuda._check("cudaDeviceGetLimit", err)
    return int(value)


def set_cuda_stack_limit(nbytes: int = DEFAULT_STACK_LIMIT_BYTES, device: int = 0) -> int:
    """Set CUDA's per-thread stack limit on ``device``; return the previous value.

    Refused (``StackLimitError``) once any CUDA graph was captured in this process,
    whatever the value: a graph captured under one limit failed to replay after the
    limit was lowered. Call it first thing in the process, right after CUDA initialises.
    """
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise StackLimitError(nbytes, None, "the limit must be a positive number of bytes")
    with _lock:
        if _graphs_captured:
            raise StackLimitError(
                nbytes, _current_or_none(device),
                f"{_graphs_captured} CUDA graph(s) were already captured in this process; a replay after "
                f"the limit changed failed on an H200 (set it before any engine loads)")
        from engine_runtime import _cuda

        rt = _cuda.runtime()
        previous = get_cuda_stack_limit(device)
        with _cuda.device(device):
            (err,) = rt.cudaDeviceSetLimit(_limit_enum(rt), nbytes)
        _cuda._check("cudaDeviceSetLimit", err)
        now = get_cuda_stack_limit(device)
    logger.info("CUDA stack limit on cuda:%d: %d -> %d bytes (asked %d)", device, previous, now, nbytes)
    return previous


def _current_or_none(device: int) -> int | None:
    try:
        return get_cuda_stack_limit(device)
    except Exception:  # noqa: BLE001 - only for the error message
        return None


class ProcessMemory:
    """This process's memory on its first visible CUDA device, as NVML (and every neighbour) sees it.

    Reads the per-process list (``nvmlDeviceGetComputeRunningProcesses``) for
    ``os.getpid()``. Where this process is not in the list (a container with its own
    PID namespace: NVML reports host PIDs) it falls back to the device's used bytes
    minus those at construction, this process's share only on a card nobody else is
    changing; ``source`` says which. Construct it before CUDA initialises for that
    fallback to mean anything.
    """

    def __init__(self) -> None:
        import pynvml

        from engine_runtime.pressure import cuda_visible_to_nvml_uuids

        self._nvml = pynvml
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        visible = cuda_visible_to_nvml_uuids(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
        if not visible:
            raise RuntimeError(f"no NVML device matches CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
        self.handle = pynvml.nvmlDeviceGetHandleByUUID(visible[0])
        self.pid = os.getpid()
        self.source = "nvml-process"
        self._list = pynvml.nvmlDeviceGetComputeRunningProcesses
        self._device_used_at_start = self._device_used()

    def _device_used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _processes(self) -> list[Any]:
        try:
            return self._list(self.handle)
        except self._nvml.NVMLError_FunctionNotFound:
            self._list = self._nvml.nvmlDeviceGetComputeRunningProcesses_v2
            return self._list(self.handle)

    def read(self) -> int:
        """Bytes this process holds on the device now."""
        mine = [p.usedGpuMemory for p in self._processes() if p.pid == self.pid]
        if mine and all(isinstance(v, int) for v in mine):
            self.source = "nvml-process"
            return sum(mine)
        self.source = "nvml-device-delta"
        return self._device_used() - self._device_used_at_start


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def warm_cuda_libraries(device: int = 0) -> None:
    """Initialise CUDA, cuBLAS and cuDNN as any PyTorch replica must, then hand back every cached byte.

    What the process holds afterwards is paid by every process serving these models, with
    Ebb or without: the context and the libraries' handles and modules. The caching
    allocator's blocks and cuBLAS workspaces are not, so they are freed.
    """
    import torch

    dev = torch.device("cuda", device)
    a = torch.randn(256, 256, device=dev)
    (a @ a).sum().item()
    x = torch.randn(2, 3, 32, 32, device=dev)
    w = torch.randn(8, 3, 3, 3, device=dev)
    torch.nn.functional.conv2d(x, w).sum().item()
    torch.cuda.synchronize(dev)
    del a, x, w
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


def measure_process_floor(device: int = 0, libraries: bool = True) -> int | None:
    """Initialise CUDA (and, with ``libraries``, cuBLAS and cuDNN: :func:`warm_cuda_libraries`),
    read this process's NVML memory and keep it as the process's floor.

    Call it after :func:`set_cuda_stack_limit` and before any engine loads; later calls
    return the kept figure. None without a GPU or NVML, or when an engine had already
    loaded (the reading would not be a floor). Kernels a model loads on first use (CUDA's
    lazy module loading) come on top, with the first engine of each architecture.
    """
    global _floor_bytes, _floor_measured
    with _lock:
        if _floor_measured:
            return _floor_bytes
        if _engines_loaded:
            logger.warning("process floor not measured: %d engine(s) loaded before the measurement", _engines_loaded)
            _floor_measured = True
            return None
        try:
            reader = ProcessMemory()
        except Exception as err:  # noqa: BLE001 - no NVML, no driver: no floor to report
            logger.info("process floor not measured: %s", err)
            return None
        try:
            import torch

            if not torch.cuda.is_available():
                _floor_measured = True
                return None
            if libraries:
                warm_cuda_libraries(device)
            else:
                # The context exists once a tensor lives on the device (torch initialises lazily).
                torch.zeros(1, device=f"cuda:{device}")
                torch.cuda.synchronize(device)
            _floor_bytes = int(reader.read())
            _floor_measured = True
        except Exception as err:  # noqa: BLE001 - reported as no floor
            logger.warning("process floor not measured: %s", err)
            return None
    logger.info("process floor on cuda:%d: %.0f MiB (%s)", device, _floor_bytes / 2**20, reader.source)
    return _floor_bytes


def process_memory_breakdown(device: int = 0) -> dict[str, int | None]:
    """Where this process's device memory is, beyond the floor: NVML's figure now, and
    what PyTorch's caching allocator holds (reserved) and uses (allocated). For the
    status view: a replica over ``floor + resident weights`` shows whether the rest sits
    in the caching allocator or outside it (arena mappings, graph executables, kernels
    loaded on first use). ``None`` where a figure cannot be read (no CUDA, no NVML)."""
    out: dict[str, int | None] = {"nvml_bytes": None, "torch_reserved_bytes": None, "torch_allocated_bytes": None}
    try:
        import torch

        if torch.cuda.is_initialized():
            out["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
            out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
    except Exception as err:  # noqa: BLE001 - a figure we cannot read is reported as unknown
        logger.debug("caching allocator figures not read: %s", err)
    try:
        reader = ProcessMemory()
        nbytes = reader.read()
        # Made just now, the reader's fallback (the device's used bytes since it was made)
        # would read about 0: only NVML's per-process figure means anything here.
        out["nvml_bytes"] = int(nbytes) if reader.source == "nvml-process" else None
    except Exception as err:  # noqa: BLE001 - no NVML: unknown
        logger.debug("NVML process figure not read: %s", err)
    return out


def process_floor_bytes() -> int | None:
    """The floor measured by :func:`measure_process_floor` (measuring it now if nothing has
    loaded yet); None without a GPU."""
    if _floor_measured:
        return _floor_bytes
    return measure_process_floor()


def _reset_for_tests() -> None:
    """Forget captures, loads and the floor (tests only)."""
    global _graphs_captured, _engines_loaded, _floor_bytes, _floor_measured
    with _lock:
        _graphs_captured = 0
        _engines_loaded = 0
        _floor_bytes = None
        _floor_measured = False
