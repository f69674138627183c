"""Starting a GPU's pool owner (a detached daemon) or joining the one running."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from engine_runtime.errors import PoolUnavailableError
from engine_runtime.memory.pool._wire import (DEFAULT_CHUNK_BYTES, PoolPaths)
from engine_runtime.memory.pool.support import pool_available
from engine_runtime.memory.pool.client import PoolPhysical

logger = logging.getLogger(__name__)


# --- starting the owner ---------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def start_owner(gpu_uuid: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, initial_chunks: int = 0,
                directory: str | os.PathLike[str] | None = None, idle_exit_s: float | None = 300.0,
                max_chunks: int | None = None) -> None:
    """Start a detached owner process for ``gpu_uuid`` and return once it has forked away.

    The owner double-forks into its own session: it is nobody's child, so neither a
    replica's crash nor a supervisor that kills a worker's children (Ray does, on
    worker exit) takes the pool down. It finds its device by UUID, so it works under
    any ``CUDA_VISIBLE_DEVICES`` that includes the GPU.
    """
    paths = PoolPaths.for_gpu(gpu_uuid, directory)
    cmd = [sys.executable, "-m", "engine_runtime.memory.pool", "--gpu-uuid", gpu_uuid, "--chunk-bytes", str(chunk_bytes),
           "--initial-chunks", str(initial_chunks), "--directory", str(paths.socket.parent), "--detach"]
    if idle_exit_s is not None:
        cmd += ["--idle-exit-s", str(idle_exit_s)]
    if max_chunks is not None:
        cmd += ["--max-chunks", str(max_chunks)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])  # so `-m engine_runtime.memory.pool` imports this copy
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(paths.log, "ab") as log:
        launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    start_new_session=True, close_fds=True)
    rc = launcher.wait()  # the launcher exits as soon as the daemon has forked
    if rc != 0:
        raise PoolUnavailableError(f"owner launcher exited with {rc}; see {paths.log}", gpu_uuid)


def connect_or_start(device_index: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, initial_chunks: int = 0,
                     directory: str | os.PathLike[str] | None = None, start_timeout_s: float = 60.0,
                     idle_exit_s: float | None = 300.0, retire_poll_s: float | None = 0.05,
                     max_chunks: int | None = None, grow_limit_chunks: int = 0,
                     keep_mapped: bool = True) -> PoolPhysical:
    """Join ``device_index``'s pool, starting its owner if this is the first replica.

    ``chunk_bytes``, ``initial_chunks`` and ``max_chunks`` only matter to the process
    that starts the owner; later ones get the running pool's settings. Raises
    :class:`PoolUnavailableError` (with the reason) where pooling is impossible.
    """
    support = pool_available(device_index, directory)
    if not support:
        raise PoolUnavailableError(support.reason, f"cuda:{device_index}")
    from engine_runtime import _cuda

    paths = PoolPaths.for_gpu(_cuda.device_uuid(device_index), directory)

    def connect() -> PoolPhysical | None:
        try:
            return PoolPhysical(paths.socket, device_index, retire_poll_s=retire_poll_s,
                                grow_limit_chunks=grow_limit_chunks, keep_mapped=keep_mapped)
        except (FileNotFoundError, ConnectionError):
            return None  # no owner yet, or one that died or is dying: (re)start it

    client = connect()
    if client is not None:
        return client
    # One starter at a time per GPU: the others wait here, then find the owner running.
    with _file_lock(paths.start_lock):
        client = connect()
        if client is not None:
            return client
        start_owner(_cuda.device_uuid(device_index), chunk_bytes=chunk_bytes, initial_chunks=initial_chunks,
                    directory=paths.socket.parent, idle_exit_s=idle_exit_s, max_chunks=max_chunks)
        deadline = time.monotonic() + start_timeout_s
        delay = 0.01
        while True:
            client = connect()
            if client is not None:
                return client
            if time.monotonic() > deadline:
                tail = paths.log.read_text(errors="replace")[-2000:] if paths.log.exists() else ""
                raise PoolUnavailableError(f"owner did not start within {start_timeout_s:.0f} s; "
                                           f"log {paths.log}:\n{tail}", f"cuda:{device_index}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
