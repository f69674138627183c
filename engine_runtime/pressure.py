"""Pressure probes: how full each GPU is right now, whoever filled it.

The coordinator decides modes from these readings. ``NvmlProbe`` reads the driver
(memory including other processes', per-process usage, utilisation); ``VirtualProbe``
stands in on hosts without a GPU, fed by the engines' own accounting plus injected
"other process" bytes; ``StaticProbe`` lets tests set readings directly. NVML
ignores ``CUDA_VISIBLE_DEVICES``, so :func:`cuda_visible_to_nvml_uuids` maps a
process's CUDA devices onto NVML's by UUID.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from engine_runtime.errors import EbbError
from engine_runtime.units import GiB

__all__ = [
    "EXTERNAL_PID",
    "GpuPressure",
    "NvmlProbe",
    "PressureProbe",
    "ProbeUnavailable",
    "StaticProbe",
    "VirtualProbe",
    "cuda_visible_to_nvml_uuids",
]


logger = logging.getLogger(__name__)


#: ``process_bytes`` key under which ``VirtualProbe`` reports injected external bytes
#: (no real process owns them; pid 0 is never a user process).
EXTERNAL_PID = 0


class ProbeUnavailable(EbbError):
    """A probe could not read a device (no NVML library, no driver, a GPU gone).

    The coordinator treats the device as unknown and holds its replicas' modes.
    """

    def __init__(self, reason: str, device: str | None = None, nvml_error_code: int | None = None):
        self.reason = reason
        self.device = device
        self.nvml_error_code = nvml_error_code
        where = f" for {device}" if device else ""
        code = f" (NVML error {nvml_error_code})" if nvml_error_code is not None else ""
        super().__init__(f"GPU pressure probe unavailable{where}: {reason}{code}")


@dataclass(frozen=True)
class GpuPressure:
    """One reading of one GPU; plain data, safe to send between processes."""

    #: NVML UUID (``GPU-…``, ``MIG-…``), or a virtual device id.
    uuid: str
    #: NVML device index (not the CUDA index of any particular process).
    index: int
    total_bytes: int
    used_bytes: int
    #: Memory the driver reserves for itself (NVML v2 ``reserved``); 0 where not reported.
    reserved_bytes: int
    free_bytes: int
    #: GPU busy percentage over NVML's last sample period; 0.0 where not reported.
    utilization_pct: float
    #: Bytes per process on this device (host pids; where the driver does not say, absent).
    process_bytes: dict[int, int] = field(default_factory=dict)
    #: Wall-clock time of the reading (``time.time()``), comparable across nodes.
    timestamp_s: float = 0.0

    @property
    def used_fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0


@runtime_checkable
class PressureProbe(Protocol):
    def read(self) -> list[GpuPressure]:
        """One reading per device this probe watches; raise ``ProbeUnavailable`` if none can be had."""
        ...


# -- CUDA_VISIBLE_DEVICES → NVML ---------------------------------------------------


def _match_uuid(entry: str, nvml_uuids: Sequence[str]) -> str | None:
    """The single NVML UUID that ``entry`` is a prefix of (case-insensitive), else None."""
    wanted = entry.lower()
    if not wanted.startswith("gpu-"):
        wanted = "gpu-" + wanted
    hits = [u for u in nvml_uuids if u.lower().startswith(wanted)]
    return hits[0] if len(hits) == 1 else None


def cuda_visible_to_nvml_uuids(env_value: str | None, nvml_uuids_by_index: list[str]) -> list[str]:
    """NVML UUIDs of the devices a process sees, in its CUDA order (CUDA index i → result[i]).

    ``env_value`` is ``CUDA_VISIBLE_DEVICES`` as Ray sets it: unset (``None``) means every
    device, in NVML order; entries are NVML indexes, full UUIDs or unique UUID prefixes
    (``GPU-1a2b``; the ``GPU-`` may be left out, but an entry of digits only is always
    an index, as CUDA reads it). ``MIG-…`` ids are passed through
    unchanged: a MIG instance's NVML UUID is that id.

    Like the CUDA runtime, the list ends at the first entry that names no device
    (out of range, negative, unknown or ambiguous UUID, a device already listed):
    CUDA ignores everything after it, so the mapping must too.
    """
    if env_value is None:
        return list(nvml_uuids_by_index)
    result: list[str] = []
    for raw in env_value.split(","):
        entry = raw.strip()
        if not entry:
            break
        if entry.upper().startswith("MIG-"):
            uuid: str | None = entry
        elif entry.lstrip("+-").isdigit():
            index = int(entry)
            uuid = nvml_uuids_by_index[index] if 0 <= index < len(nvml_uuids_by_index) else None
        else:
            uuid = _match_uuid(entry, nvml_uuids_by_index)
        if uuid is None or uuid in result:
            break
        result.append(uuid)
    return result


# -- NVML --------------------------------------------------------------------------


def _nvml_code(err: Exception) -> int | None:
    value = getattr(err, "value", None)
    return int(value) if isinstance(value, int) else None


class NvmlProbe:
    """Reads GPUs through NVML (nvidia-ml-py). NVML is initialised once, at construction.

    ``uuids`` restricts the reading to those devices (for instance the output of
    :func:`cuda_visible_to_nvml_uuids`); ``None`` reads every device on the node.
    """

    def __init__(self, uuids: Sequence[str] | None = None) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise ProbeUnavailable("nvidia-ml-py (module pynvml) is not installed") from err
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise ProbeUnavailable(f"nvmlInit failed: {err}", nvml_error_code=_nvml_code(err)) from err
        self._closed = False
        self._lock = threading.Lock()
        # v2 adds the driver's ``reserved`` bytes; older drivers lack the symbol.
        self._memory_version = getattr(pynvml, "nvmlMemory_v2", None)
        try:
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            all_uuids = [self._uuid(h) for h in handles]
        except pynvml.NVMLError as err:
            self.close()
            raise ProbeUnavailable(f"cannot enumerate devices: {err}", nvml_error_code=_nvml_code(err)) from err
        self._all_uuids = all_uuids
        wanted = list(all_uuids) if uuids is None else list(uuids)
        by_uuid = {u: (i, h) for i, (u, h) in enumerate(zip(all_uuids, handles))}
        missing = [u for u in wanted if u not in by_uuid and not u.upper().startswith("MIG-")]
        if missing:
            self.close()
            raise ProbeUnavailable(f"no NVML device with UUID {missing}; NVML sees {all_uuids}")
        self._devices: list[tuple[str, int, object]] = []
        for u in wanted:
            if u in by_uuid:
                index, handle = by_uuid[u]
            else:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(u)
                except pynvml.NVMLError as err:
                    self.close()
                    raise ProbeUnavailable(f"no handle for {u}: {err}", u, _nvml_code(err)) from err
                index = -1
            self._devices.append((u, index, handle))

    def _uuid(self, handle) -> str:
        value = self._nvml.nvmlDeviceGetUUID(handle)
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def uuids_by_index(self) -> list[str]:
        """Every device's UUID in NVML index order (the table the CUDA mapping needs)."""
        return list(self._all_uuids)

    def _memory(self, handle) -> tuple[int, int, int, int]:
        nvml = self._nvml
        if self._memory_version is not None:
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=self._memory_version)
                return int(mem.total), int(mem.used), int(mem.reserved), int(mem.free)
            except nvml.NVMLError as err:
                # Drivers before R510 have no v2 entry point; fall back once and for good.
                if _nvml_code(err) not in (nvml.NVML_ERROR_FUNCTION_NOT_FOUND, nvml.NVML_ERROR_NOT_SUPPORTED):
                    raise
                logger.info("NVML memory info v2 unavailable (%s); reading v1, reserved bytes reported as 0", err)
                self._memory_version = None
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(mem.total), int(mem.used), 0, int(mem.free)

    def _processes(self, handle) -> dict[int, int]:
        out: dict[int, int] = {}
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = getattr(proc, "usedGpuMemory", None)
            if used is not None:
                out[int(proc.pid)] = out.get(int(proc.pid), 0) + int(used)
        return out

    def _utilization(self, handle) -> float:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError:
            # MIG instances and some virtualised GPUs report no utilisation; memory still counts.
            return 0.0

    def read(self) -> list[GpuPressure]:
        nvml = self._nvml
        with self._lock:
            if self._closed:
                raise ProbeUnavailable("probe is closed")
            readings = []
            for uuid, index, handle in self._devices:
                try:
                    total, used, reserved, free = self._memory(handle)
                    procs = self._processes(handle)
                except nvml.NVMLError as err:
                    raise ProbeUnavailable(f"reading failed: {err}", uuid, _nvml_code(err)) from err
                readings.append(
                    GpuPressure(
                        uuid=uuid,
                        index=index,
                        total_bytes=total,
                        used_bytes=used,
                        reserved_bytes=reserved,
                        free_bytes=free,
                        utilization_pct=self._utilization(handle),
                        process_bytes=procs,
                        timestamp_s=time.time(),
                    )
                )
            return readings

    def close(self) -> None:
        """Shut NVML down (it counts inits, so other users in this process are unaffected)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as err:
            logger.warning("nvmlShutdown failed: %s", err)


# -- hosts without a GPU, and tests -------------------------------------------------


class VirtualProbe:
    """Virtual devices for hosts without a GPU.

    ``used = accounted_bytes_fn(uuid) + injected external bytes``: the first is what
    this node's engines account (weights plus context held), the second simulates
    another process (another application, a training job) taking memory.
    """

    def __init__(self, total_bytes_by_uuid: Mapping[str, int], accounted_bytes_fn: Callable[[str], int] | None = None):
        bad = {u: t for u, t in total_bytes_by_uuid.items() if int(t) <= 0}
        if bad:
            raise ValueError(f"virtual device totals must be > 0 bytes, got {bad}")
        self._totals = {u: int(t) for u, t in total_bytes_by_uuid.items()}
        self._accounted = accounted_bytes_fn or (lambda uuid: 0)
        self._external: dict[str, int] = {u: 0 for u in self._totals}
        self._lock = threading.Lock()

    def inject_external(self, uuid: str, nbytes: int) -> None:
        """Set (not add) the bytes another process holds on ``uuid``; 0 removes them."""
        if uuid not in self._totals:
            raise KeyError(f"unknown virtual device {uuid!r}; known: {sorted(self._totals)}")
        if nbytes < 0:
            raise ValueError(f"injected bytes must be >= 0, got {nbytes}")
        with self._lock:
            self._external[uuid] = int(nbytes)
        logger.info("virtual %s: external pressure set to %.2f GiB", uuid, nbytes / GiB)

    def read(self) -> list[GpuPressure]:
        with self._lock:
            external = dict(self._external)
        readings = []
        for index, (uuid, total) in enumerate(self._totals.items()):
            accounted = int(self._accounted(uuid))
            used = accounted + external[uuid]
            procs = {os.getpid(): accounted}
            if external[uuid]:
                procs[EXTERNAL_PID] = external[uuid]
            readings.append(
                GpuPressure(
                    uuid=uuid,
                    index=index,
                    total_bytes=total,
                    used_bytes=used,
                    reserved_bytes=0,
                    free_bytes=max(0, total - used),
                    utilization_pct=0.0,
                    process_bytes=procs,
                    timestamp_s=time.time(),
                )
            )
        return readings


class StaticProbe:
    """Readings set by a test; ``fail()`` makes ``read()`` raise ``ProbeUnavailable``."""

    def __init__(self, readings: Sequence[GpuPressure] = ()) -> None:
        self._lock = threading.Lock()
        self._readings = list(readings)
        self._failure: str | None = None

    def set(self, readings: Sequence[GpuPressure]) -> None:
        with self._lock:
            self._readings = list(readings)

    def update(self, uuid: str, **fields) -> None:
        """Change fields of one device's reading (``used_bytes=…``); free follows used."""
        with self._lock:
            for i, r in enumerate(self._readings):
                if r.uuid == uuid:
                    new = replace(r, **fields)
                    if "used_bytes" in fields and "free_bytes" not in fields:
                        new = replace(new, free_bytes=max(0, new.total_bytes - new.used_bytes))
                    self._readings[i] = new
                    return
            raise KeyError(f"no reading for {uuid!r}; known: {[r.uuid for r in self._readings]}")

    def fail(self, reason: str | None) -> None:
        """Make reads fail with ``reason``; ``None`` makes them succeed again."""
        with self._lock:
            self._failure = reason

    def read(self) -> list[GpuPressure]:
        with self._lock:
            if self._failure is not None:
                raise ProbeUnavailable(self._failure)
            return [replace(r, timestamp_s=time.time()) for r in self._readings]
