"""Thin, checked wrappers over ``cuda.bindings`` (driver and runtime APIs).

Imported only where a GPU is used, so CPU hosts never need cuda-python. Every
function raises :class:`EbbInternalError` with the CUDA error name on failure,
except allocation failures, which callers turn into ``ContextMemoryUnavailable``.
"""

from __future__ import annotations

import contextlib
import functools

from engine_runtime.errors import EbbInternalError


class CudaError(EbbInternalError):
    def __init__(self, call: str, err) -> None:
        self.call = call
        self.code = int(err)
        self.oom = self.code == 2  # CUDA_ERROR_OUT_OF_MEMORY / cudaErrorMemoryAllocation
        super().__init__(f"{call} failed: {getattr(err, 'name', err)}")


@functools.cache
def driver():
    from cuda.bindings import driver as drv

    (err,) = drv.cuInit(0)
    _check("cuInit", err)
    return drv


@functools.cache
def runtime():
    from cuda.bindings import runtime as rt

    return rt


def _check(call: str, err) -> None:
    if int(err) != 0:
        raise CudaError(call, err)


def available() -> bool:
    """True when cuda-python imports and a device is visible."""
    try:
        err, count = runtime().cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - any import or driver failure means "no CUDA here"
        return False
    return int(err) == 0 and count > 0


@contextlib.contextmanager
def device(index: int):
    """Make ``index``'s primary context current on this thread; restore the previous one."""
    rt = runtime()
    err, prev = rt.cudaGetDevice()
    _check("cudaGetDevice", err)
    if prev != index:
        _check("cudaSetDevice", rt.cudaSetDevice(index)[0])
    try:
        yield
    finally:
        if prev != index:
            rt.cudaSetDevice(prev)


def mem_get_info(index: int) -> tuple[int, int]:
    with device(index):
        err, free, total = runtime().cudaMemGetInfo()
    _check("cudaMemGetInfo", err)
    return int(free), int(total)


def device_uuid(index: int) -> str:
    """``GPU-xxxxxxxx-...`` as NVML prints it, for mapping CUDA ordinals to NVML devices."""
    err, props = runtime().cudaGetDeviceProperties(index)
    _check("cudaGetDeviceProperties", err)
    raw = bytes(props.uuid.bytes)
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def create_stream(index: int) -> int:
    """One non-blocking stream, as a raw handle.

    PyTorch's ``torch.cuda.Stream()`` draws from a pool it creates on first use (32
    streams per priority): about 70 MiB of device memory per process on an H200,
    kept for the process's life. One stream of our own costs next to nothing; wrap it
    with ``torch.cuda.ExternalStream``.
    """
    rt = runtime()
    with device(index):
        err, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    _check("cudaStreamCreateWithFlags", err)
    return int(stream)


def destroy_stream(index: int, handle: int) -> None:
    rt = runtime()
    with device(index):
        _check("cudaStreamSynchronize", rt.cudaStreamSynchronize(handle)[0])
        _check("cudaStreamDestroy", rt.cudaStreamDestroy(handle)[0])


# --- virtual memory management (VMM) -------------------------------------------


def _prop(index: int, shareable: bool):
    drv = driver()
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    if shareable:
        prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


@functools.cache
def granularity(index: int) -> int:
    drv = driver()
    err, gran = drv.cuMemGetAllocationGranularity(
        _prop(index, False), drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    )
    _check("cuMemGetAllocationGranularity", err)
    return int(gran)


def vmm_supported(index: int) -> bool:
    try:
        drv = driver()
        err, val = drv.cuDeviceGetAttribute(
            drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, index
        )
        return int(err) == 0 and bool(val)
    except Exception:  # noqa: BLE001 - no driver, no VMM
        return False


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def mem_create(index: int, nbytes: int, shareable: bool = False):
    """Physical memory; returns the handle or raises CudaError (``.oom`` when out of memory)."""
    err, handle = driver().cuMemCreate(nbytes, _prop(index, shareable), 0)
    _check("cuMemCreate", err)
    return handle


def mem_release(handle) -> None:
    _check("cuMemRelease", driver().cuMemRelease(handle)[0])


def address_reserve(nbytes: int, alignment: int) -> int:
    err, ptr = driver().cuMemAddressReserve(nbytes, alignment, 0, 0)
    _check("cuMemAddressReserve", err)
    return int(ptr)


def address_free(ptr: int, nbytes: int) -> None:
    _check("cuMemAddressFree", driver().cuMemAddressFree(ptr, nbytes)[0])


def mem_map(ptr: int, nbytes: int, handle, offset: int = 0) -> None:
    _check("cuMemMap", driver().cuMemMap(ptr, nbytes, offset, handle, 0)[0])


def mem_unmap(ptr: int, nbytes: int) -> None:
    _check("cuMemUnmap", driver().cuMemUnmap(ptr, nbytes)[0])


@functools.cache
def _access_descs(index: int) -> list:
    """Read-write access for device ``index``: one descriptor per device, made once (a
    mapping sets access on every call, and building the descriptor costs more than
    the driver call's Python side)."""
    drv = driver()
    desc = drv.CUmemAccessDesc()
    desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = index
    desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return [desc]


def set_access(index: int, ptr: int, nbytes: int) -> None:
    _check("cuMemSetAccess", driver().cuMemSetAccess(ptr, nbytes, _access_descs(index), 1)[0])


def export_fd(handle) -> int:
    drv = driver()
    err, fd = drv.cuMemExportToShareableHandle(
        handle, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
    )
    _check("cuMemExportToShareableHandle", err)
    return int(fd)


def import_fd(fd: int):
    drv = driver()
    err, handle = drv.cuMemImportFromShareableHandle(
        fd, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    )
    _check("cuMemImportFromShareableHandle", err)
    return handle
