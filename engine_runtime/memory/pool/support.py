"""Whether this host can pool context memory at all, and why not."""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_runtime.memory.pool._wire import (default_directory)

logger = logging.getLogger(__name__)


def _bind_device(cuda: Any, index: int) -> None:
    """Make ``index`` current on this thread, its primary context created.

    The runtime creates contexts lazily and VMM driver calls need a current one. Only
    for threads of the pool's own (the owner's main thread, a client's watcher): they
    have no previous device worth restoring.
    """
    rt = cuda.runtime()
    cuda._check("cudaSetDevice", rt.cudaSetDevice(index)[0])
    cuda._check("cudaFree", rt.cudaFree(0)[0])


def _ensure_context(cuda: Any, index: int) -> None:
    """Create ``index``'s primary context if this process has none yet, leaving the
    calling thread's current device as it was."""
    with cuda.device(index):
        cuda._check("cudaFree", cuda.runtime().cudaFree(0)[0])


# --- availability -------------------------------------------------------------------


@dataclass(frozen=True)
class PoolSupport:
    """Whether the pool can run here; ``reason`` says why not (for logs and the status view)."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def pool_available(device_index: int = 0, directory: str | os.PathLike[str] | None = None) -> PoolSupport:
    """Probe for everything the pool needs; never raises.

    The probe creates and exports one granule of shareable memory: drivers that
    support VMM but not descriptor export fail only there.
    """
    if not sys.platform.startswith("linux"):
        return PoolSupport(False, f"needs Linux (file-descriptor passing, flock); this is {sys.platform}")
    if not hasattr(socket, "send_fds"):
        return PoolSupport(False, "needs Python 3.9+ for socket.send_fds")
    d = Path(directory) if directory is not None else default_directory()
    if not (d.is_dir() and os.access(d, os.W_OK)):
        return PoolSupport(False, f"pool directory {d} is not writable")
    try:
        from engine_runtime import _cuda
    except ImportError as err:
        return PoolSupport(False, f"cuda-python is not installed ({err})")
    if not _cuda.available():
        return PoolSupport(False, "no CUDA device visible")
    if not _cuda.vmm_supported(device_index):
        return PoolSupport(False, f"cuda:{device_index} does not support virtual memory management")
    try:
        _ensure_context(_cuda, device_index)
        with _cuda.device(device_index):
            handle = _cuda.mem_create(device_index, _cuda.granularity(device_index), shareable=True)
            try:
                os.close(_cuda.export_fd(handle))
            finally:
                _cuda.mem_release(handle)
    except Exception as err:  # noqa: BLE001 - any failure here means "use another mechanism"
        return PoolSupport(False, f"cuda:{device_index} cannot export memory as a file descriptor ({err})")
    return PoolSupport(True, "")
