"""The rendezvous of one GPU's pool: where its files live, and the messages on its socket."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_runtime.errors import EbbInternalError
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


#: Default chunk size. Mapping cost grows with the number of chunks in a lease and the
#: waste is under one chunk per lease; ``scripts/bench_pool.py`` measures the trade-off.
DEFAULT_CHUNK_BYTES = 64 * MiB
#: SCM_MAX_FD is 253 on Linux: descriptors go in batches below it.
_FDS_PER_MESSAGE = 250
_MAX_MESSAGE_BYTES = 1 << 20
#: Owner housekeeping period: dead holders reclaimed, retired chunks released.
_HOUSEKEEPING_S = 0.1


# --- where a GPU's pool lives ---------------------------------------------------------


def default_directory() -> Path:
    """``$EBB_POOL_DIR``, else ``/dev/shm`` (memory-backed, node-local), else the temp dir."""
    env = os.environ.get("EBB_POOL_DIR")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


@dataclass(frozen=True)
class PoolPaths:
    """The files of one GPU's pool, keyed by the GPU's UUID (stable across CUDA_VISIBLE_DEVICES)."""

    table: Path
    socket: Path
    start_lock: Path
    log: Path

    @classmethod
    def for_gpu(cls, gpu_uuid: str, directory: str | os.PathLike[str] | None = None) -> PoolPaths:
        d = Path(directory) if directory is not None else default_directory()
        stem = f"ebb-pool-{gpu_uuid}"
        return cls(d / f"{stem}.table", d / f"{stem}.sock", d / f"{stem}.start.lock", d / f"{stem}.log")


# --- the wire: SOCK_SEQPACKET messages of JSON, descriptors attached -------------------
# SEQPACKET keeps message boundaries, so descriptors always arrive with the message
# they belong to (a byte stream may split or merge the data they ride on).


def _send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, _MAX_MESSAGE_BYTES, _FDS_PER_MESSAGE + 3)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise EbbInternalError(f"pool message truncated (flags 0x{flags:x}, {len(data)} bytes, {len(fds)} fds)")
    if not data:
        for fd in fds:
            os.close(fd)
        raise ConnectionResetError("pool peer closed the connection")
    return json.loads(data), fds
