"""One pool of context memory per GPU, lent to whichever replica process is running a call.

Physical memory is premade in chunks (CUDA VMM, exportable as POSIX file
descriptors) by one **owner** process per GPU per node (:class:`ContextPool`). Each
replica process connects once over a Unix domain socket, receives every chunk's
descriptor (``SCM_RIGHTS``), imports them and closes the descriptors
(:class:`PoolPhysical`). From then on a lease is a choice of chunk indices in a
shared-memory lease table (:mod:`engine_runtime._lease_table`): no descriptor traffic
and no round trip to the owner per call. A replica's ``VmmArena`` maps the leased
chunks at its stable address for the call, unmaps them, and gives them back. Context
memory on the card then scales with the calls running at once, not with the replicas.

Who owns what
    The owner creates and releases chunks and is the only process that changes the
    pool's size. It is a daemon of its own (started detached by the first replica on
    the GPU through :func:`connect_or_start`, ``python -m engine_runtime.pool``), so a
    replica crash never takes the pool with it; it exits after ``idle_exit_s`` with no
    replica connected, releasing its memory. Chunks leased by a dead replica are
    reclaimed by the owner (on the replica's socket closing and periodically) and by
    any replica waiting for chunks.

Growing
    The owner creates memory for new chunks, then commits them to the table and bumps
    the table's generation. A replica learns on its next lease: any chunk it was lent
    but has not imported (or imported in an older incarnation) is fetched from the
    owner then, once.

Shrinking
    Free chunks retire at once; leased chunks *drain* (stay with their holder until
    given back, then retire). The owner releases retired chunks with ``cuMemRelease``,
    but the physical memory only returns to the driver once **every** process has
    released its imported handle too. So replicas must drop retired handles promptly:
    each :class:`PoolPhysical` runs a watcher thread that checks the table's
    generation every ``retire_poll_s`` (one shared-memory read) and releases handles
    of retired or recreated chunks, and does the same check on every lease.

Fallback
    :func:`pool_available` says whether this host can pool at all (Linux, CUDA VMM,
    POSIX-descriptor export, a writable ``/dev/shm``) and why not; where it cannot, the
    engine keeps its own mechanism (``OwnedPhysical`` or ``empty_cache``).

Security: the socket and the table are created ``0600``, so only the user running the
replicas can lease or import the GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_runtime._lease_table import ChunkState, LeaseTable, ResizePlan, TableSnapshot
from engine_runtime.arena import PhysicalLease
from engine_runtime.errors import ContextMemoryUnavailable, EbbError, EbbInternalError
from engine_runtime.memory import ContextMechanism, MiB

logger = logging.getLogger(__name__)

GiB = 2**30

#: Default chunk size. Mapping cost grows with the number of chunks in a lease and the
#: waste is under one chunk per lease; ``scripts/bench_pool.py`` measures the trade-off.
DEFAULT_CHUNK_BYTES = 64 * MiB
#: SCM_MAX_FD is 253 on Linux: descriptors go in batches below it.
_FDS_PER_MESSAGE = 250
_MAX_MESSAGE_BYTES = 1 << 20
#: Owner housekeeping period: dead holders reclaimed, retired chunks released.
_HOUSEKEEPING_S = 0.1


class PoolUnavailableError(EbbError):
    """The pool cannot be used here or its owner cannot be reached; use another mechanism."""

    def __init__(self, reason: str, where: str = "") -> None:
        self.reason = reason
        self.where = where
        super().__init__(f"context pool unavailable{f' on {where}' if where else ''}: {reason}")


# --- where a GPU's pool lives ------------------------------------------------------------


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


# --- availability ----------------------------------------------------------------------


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


# --- the wire: SOCK_SEQPACKET messages of JSON, descriptors attached ----------------------
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


# --- the owner -------------------------------------------------------------------------


class ContextPool:
    """The owner of one GPU's pool: creates chunks, lends their descriptors, resizes.

    Runs in its own process (``python -m engine_runtime.pool``); :meth:`serve_forever`
    answers replicas until stopped, idle for ``idle_exit_s``, or signalled.
    """

    def __init__(self, device_index: int, gpu_uuid: str, chunk_bytes: int, initial_chunks: int,
                 socket_path: str | os.PathLike[str], *, table_path: str | os.PathLike[str] | None = None,
                 max_chunks: int | None = None, idle_exit_s: float | None = None) -> None:
        from engine_runtime import _cuda

        self._cuda = _cuda
        self.device = device_index
        self.gpu_uuid = gpu_uuid
        self.where = f"cuda:{device_index} {gpu_uuid}"
        gran = _cuda.granularity(device_index)
        if chunk_bytes <= 0 or chunk_bytes % gran:
            raise ValueError(f"chunk_bytes {chunk_bytes} must be a positive multiple of the "
                             f"{gran / MiB:.0f} MiB VMM granularity of cuda:{device_index}")
        actual = _cuda.device_uuid(device_index)
        if actual != gpu_uuid:
            raise EbbInternalError(f"cuda:{device_index} is {actual}, not {gpu_uuid}")
        total = _cuda.mem_get_info(device_index)[1]
        self.chunk_bytes = int(chunk_bytes)
        self.max_chunks = int(max_chunks) if max_chunks else max(1, total // self.chunk_bytes)
        self.idle_exit_s = idle_exit_s
        self.socket_path = Path(socket_path)
        self.table_path = Path(table_path) if table_path else self.socket_path.with_suffix(".table")
        self._handles: dict[int, Any] = {}  # chunk index -> this process's allocation handle
        self._stop = threading.Event()
        self._sel: selectors.BaseSelector | None = None
        self.table: LeaseTable | None = None
        # Bind first: it fails if another owner is alive, before we replace its table.
        self._listen: socket.socket | None = self._bind()
        try:
            self.table = LeaseTable.create(self.table_path, self.max_chunks, self.chunk_bytes,
                                           label=f"pool {self.where}")
            if initial_chunks:
                self.resize(initial_chunks)
        except BaseException:
            self.close()
            raise
        logger.info("context pool on %s: %d x %.0f MiB chunks (%.2f GiB), up to %d, socket %s",
                    self.where, self.table.capacity, self.chunk_bytes / MiB,
                    self.table.capacity * self.chunk_bytes / GiB, self.max_chunks, self.socket_path)

    def _bind(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(self.socket_path))
                raise PoolUnavailableError(f"another owner already serves {self.socket_path}", self.where)
            except ConnectionRefusedError:
                self.socket_path.unlink()  # left by an owner that died
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)  # created 0600: only this user may import the memory
        try:
            sock.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    # -- size ---------------------------------------------------------------------------

    def resize(self, nchunks: int) -> dict[str, Any]:
        """Grow or shrink to ``nchunks``; returns what happened (capacity reached, counts).

        Growth stops early, with the capacity lowered to what exists, when the driver
        runs out of memory: the pool follows the card, it never overcommits it.
        """
        cuda = self._cuda
        self._release_retired()
        plan: ResizePlan = self.table.resize(nchunks)
        created: list[int] = []
        error = ""
        with cuda.device(self.device):
            for k, index in enumerate(plan.to_create):
                try:
                    self._handles[index] = cuda.mem_create(self.device, self.chunk_bytes, shareable=True)
                except cuda.CudaError as err:
                    self.table.abort_created(plan.to_create[k:])
                    if not err.oom:
                        self.table.commit_created(created)
                        raise
                    error = f"out of device memory after {len(created)} of {len(plan.to_create)} new chunks"
                    break
                created.append(index)
            for index in self.table.commit_created(created):
                cuda.mem_release(self._handles.pop(index))  # cancelled by a shrink meanwhile
        self._release_retired()
        result = {"capacity": self.table.capacity, "created": len(created), "retired": len(plan.retired),
                  "draining": len(plan.draining), "revived": len(plan.revived),
                  "pool_bytes": len(self._handles) * self.chunk_bytes, "error": error}
        logger.info("pool %s resized to %d chunks (%.2f GiB held): %s", self.where, result["capacity"],
                    result["pool_bytes"] / GiB, result)
        return result

    def _release_retired(self) -> None:
        retired = self.table.collect_retired()
        if not retired:
            return
        with self._cuda.device(self.device):
            for index in retired:
                self._cuda.mem_release(self._handles.pop(index))
        logger.info("pool %s released %d retired chunk(s) (%.0f MiB) to the driver", self.where,
                    len(retired), len(retired) * self.chunk_bytes / MiB)

    # -- serving ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Answer replicas until :meth:`stop`, a ``shutdown`` request, or ``idle_exit_s`` alone."""
        if self._listen is None:
            raise EbbInternalError("pool is closed")
        self._sel = sel = selectors.DefaultSelector()
        sel.register(self._listen, selectors.EVENT_READ)
        clients = 0
        last_client = time.monotonic()
        last_housekeeping = 0.0
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=_HOUSEKEEPING_S):
                if key.fileobj is self._listen:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self._listen.accept()
                        conn.setblocking(True)
                        sel.register(conn, selectors.EVENT_READ)
                        clients += 1
                    continue
                conn = key.fileobj
                if not self._answer(conn):
                    sel.unregister(conn)
                    conn.close()
                    clients -= 1
                    last_client = time.monotonic()
                    self.table.reclaim_dead()
            now = time.monotonic()
            if now - last_housekeeping >= _HOUSEKEEPING_S:
                last_housekeeping = now
                self.table.reclaim_dead()
                self._release_retired()
            if clients == 0 and self.idle_exit_s is not None and now - last_client >= self.idle_exit_s:
                logger.info("pool %s: no replica for %.0f s, exiting", self.where, self.idle_exit_s)
                break
        for key in list(sel.get_map().values()):
            if key.fileobj is not self._listen:
                key.fileobj.close()
        sel.close()
        self._sel = None

    def stop(self) -> None:
        self._stop.set()

    def _answer(self, conn: socket.socket) -> bool:
        """Handle one request; False when the peer has gone."""
        try:
            request, fds = _recv(conn)
        except (ConnectionError, OSError):
            return False
        for fd in fds:
            os.close(fd)  # replicas never send descriptors
        op = request.get("op")
        try:
            if op == "hello":
                live = [i for i in sorted(self._handles)
                        if self.table.chunk_state(i) in (ChunkState.FREE, ChunkState.LEASED, ChunkState.DRAINING)]
                _send(conn, {"ok": True, "table": str(self.table_path), "chunk_bytes": self.chunk_bytes,
                             "gpu_uuid": self.gpu_uuid, "owner_pid": os.getpid()})
                self._send_chunks(conn, live)
            elif op == "fetch":
                wanted = [int(i) for i in request["indices"]]
                missing = [i for i in wanted if i not in self._handles]
                if missing:
                    raise EbbInternalError(f"chunks {missing} have no memory in the owner")
                _send(conn, {"ok": True})
                self._send_chunks(conn, wanted)
            elif op == "resize":
                _send(conn, {"ok": True, **self.resize(int(request["nchunks"]))})
            elif op == "shutdown":
                _send(conn, {"ok": True})
                self._stop.set()
            else:
                raise ValueError(f"unknown pool request {op!r}; expected hello, fetch, resize or shutdown")
        except (ConnectionError, BrokenPipeError):
            return False
        except Exception as err:  # noqa: BLE001 - one bad request must not take the GPU's pool down
            logger.exception("pool %s: request %s failed", self.where, op)
            with contextlib.suppress(OSError):
                _send(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
        return True

    def _send_chunks(self, conn: socket.socket, indices: list[int]) -> None:
        """Descriptors go out in batches; each is exported for this send and closed after."""
        with self._cuda.device(self.device):
            for start in range(0, max(len(indices), 1), _FDS_PER_MESSAGE):
                batch = indices[start:start + _FDS_PER_MESSAGE]
                fds: list[int] = []
                try:
                    for i in batch:
                        fds.append(self._cuda.export_fd(self._handles[i]))
                    more = start + _FDS_PER_MESSAGE < len(indices)
                    _send(conn, {"chunks": [[i, self.table.chunk_generation(i)] for i in batch], "more": more}, fds)
                finally:
                    for fd in fds:
                        os.close(fd)

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Release every chunk and remove the socket and table; idempotent.

        Replicas that imported chunks keep that memory alive until they release their
        handles (their leases keep working); nobody new can join.
        """
        if self._listen is not None:
            self._listen.close()
            self._listen = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._handles:
            with self._cuda.device(self.device):
                for handle in self._handles.values():
                    self._cuda.mem_release(handle)
            logger.info("pool %s closed, %d chunk(s) released", self.where, len(self._handles))
            self._handles.clear()
        if self.table is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.table_path).st_ino == os.fstat(self.table._fd).st_ino:
                    self.table_path.unlink()  # only our own table, not a successor's
            self.table.close()
            self.table = None

    def __enter__(self) -> ContextPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the client ------------------------------------------------------------------------


class PoolPhysical:
    """A replica's view of its GPU's pool: a ``PhysicalSource`` for ``VmmArena``.

    ``acquire`` leases ``ceil(nbytes / chunk_bytes)`` chunks and returns their
    imported handles as the lease's pieces; releasing the lease (the arena does, after
    unmapping) gives them back. Static mode is a lease that is never released.

    ``grow_limit_chunks``: a lease of more chunks than the pool now has could never be
    granted (the table refuses it at once), so the client first asks the owner to grow
    to fit it, for leases of up to this many chunks (0: never). That lets a replica's
    first call run in a pool its coordinator sized before it knew that replica's
    context (empty, say, while no replica had loaded).
    """

    mechanism = ContextMechanism.VMM_POOL

    def __init__(self, socket_path: str | os.PathLike[str], device_index: int, *,
                 connect_timeout_s: float = 10.0, retire_poll_s: float | None = 0.05,
                 grow_limit_chunks: int = 0, keep_mapped: bool = True) -> None:
        from engine_runtime import _cuda

        self._cuda = _cuda
        self.device = device_index
        self.grow_limit_chunks = int(grow_limit_chunks)
        self.socket_path = Path(socket_path)
        _ensure_context(_cuda, device_index)
        self._lock = threading.Lock()  # the socket and the handle map
        self._handles: dict[int, tuple[int, Any]] = {}  # chunk index -> (slot generation, handle)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Chunks whose imports were dropped (retired or recreated) and not yet told to the
        # listeners: arenas that keep a chunk mapped between calls must unmap it, or its
        # memory never returns to the driver. Told by the watcher, outside ``_lock``
        # (an arena's lock is taken before ours on the call path).
        self._gone_untold: set[int] = set()
        self._retire_listeners: list[Any] = []
        self.table: LeaseTable | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.settimeout(connect_timeout_s)
            self._sock.connect(str(self.socket_path))
            _send(self._sock, {"op": "hello", "pid": os.getpid()})
            hello = self._reply()
            self.chunk_bytes = int(hello["chunk_bytes"])
            self.gpu_uuid = str(hello["gpu_uuid"])
            self.owner_pid = int(hello["owner_pid"])
            self.where = f"pool cuda:{device_index} {self.gpu_uuid}"
            # The table before the chunks: their generations are read from it on lease.
            self.table = LeaseTable.open(hello["table"])
            self._sync_generation = self.table.generation
            with self._lock:
                self._import_chunks_locked()
        except BaseException:
            self.close()
            raise
        self._sock.settimeout(None)
        # Arenas may leave chunks mapped between calls (``VmmArena``) only where a watcher
        # will tell them to unmap retired ones.
        self.keep_mapped = bool(keep_mapped and retire_poll_s)
        if retire_poll_s:
            self._watcher = threading.Thread(target=self._watch, args=(retire_poll_s,),
                                             name=f"ebb-pool-watch-{device_index}", daemon=True)
            self._watcher.start()
        logger.info("joined %s: %d chunk(s) of %.0f MiB imported", self.where, len(self._handles),
                    self.chunk_bytes / MiB)

    # -- talking to the owner -------------------------------------------------------------

    def _reply(self) -> dict[str, Any]:
        msg, fds = _recv(self._sock)
        for fd in fds:
            os.close(fd)
        if not msg.get("ok"):
            raise PoolUnavailableError(f"owner refused: {msg.get('error')}", str(self.socket_path))
        return msg

    def _import_chunks_locked(self) -> None:
        """Read chunk batches (index, generation, descriptor) and import each, closing the descriptor."""
        cuda = self._cuda
        with cuda.device(self.device):
            while True:
                msg, fds = _recv(self._sock)
                try:
                    chunks = msg["chunks"]
                    if len(chunks) != len(fds):
                        raise EbbInternalError(f"pool sent {len(chunks)} chunks with {len(fds)} descriptors")
                    for (index, gen), fd in zip(chunks, fds, strict=True):
                        handle = cuda.import_fd(fd)
                        old = self._handles.pop(index, None)
                        if old is not None:
                            cuda.mem_release(old[1])
                        self._handles[index] = (int(gen), handle)
                finally:
                    for fd in fds:
                        os.close(fd)
                if not msg.get("more"):
                    return

    def _fetch_locked(self, indices: list[int]) -> None:
        try:
            _send(self._sock, {"op": "fetch", "indices": indices})
            self._reply()
            self._import_chunks_locked()
        except (ConnectionError, OSError) as err:
            raise PoolUnavailableError(f"owner at {self.socket_path} unreachable while fetching "
                                       f"new chunks {indices} ({err})", self.where) from err

    def resize(self, nchunks: int) -> dict[str, Any]:
        """Ask the owner to grow or shrink the pool to ``nchunks``; returns what it did."""
        with self._lock:
            try:
                _send(self._sock, {"op": "resize", "nchunks": int(nchunks)})
                return self._reply()
            except (ConnectionError, OSError) as err:
                raise PoolUnavailableError(f"owner at {self.socket_path} unreachable ({err})", self.where) from err

    def shutdown_owner(self) -> None:
        """Ask the owner to exit (tests, benchmarks); replicas keep what they imported."""
        with self._lock:
            _send(self._sock, {"op": "shutdown"})
            self._reply()

    # -- retired chunks ------------------------------------------------------------------

    def _drop_retired_locked(self) -> None:
        """Release imports of chunks that retired or were recreated since the last look."""
        gen = self.table.generation
        if gen == self._sync_generation:
            return
        # Read before scanning: a change during the scan shows up on the next look.
        self._sync_generation = gen
        gone = [i for i, (g, _) in self._handles.items()
                if self.table.chunk_state(i) in (ChunkState.ABSENT, ChunkState.RETIRED, ChunkState.CREATING)
                or self.table.chunk_generation(i) != g]
        if not gone:
            return
        with self._cuda.device(self.device):
            for i in gone:
                self._cuda.mem_release(self._handles.pop(i)[1])
        self._gone_untold.update(gone)
        logger.debug("%s: released %d retired chunk import(s)", self.where, len(gone))

    def add_retire_listener(self, fn: Any) -> None:
        """Call ``fn(chunk_indices)`` (from the watcher thread) when chunks this process
        imported are retired or recreated: whoever keeps them mapped must unmap them."""
        with self._lock:
            self._retire_listeners.append(fn)

    def remove_retire_listener(self, fn: Any) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._retire_listeners.remove(fn)

    def _watch(self, period_s: float) -> None:
        _bind_device(self._cuda, self.device)
        while not self._stop.wait(period_s):
            try:
                with self._lock:
                    if self.table is None:
                        return
                    self._drop_retired_locked()
                    gone, self._gone_untold = self._gone_untold, set()
                    listeners = list(self._retire_listeners)
                if gone:
                    for fn in listeners:
                        fn(sorted(gone))
            except Exception:  # noqa: BLE001 - the watcher must outlive a transient failure; say so
                logger.exception("%s: releasing retired chunk imports failed", self.where)

    # -- PhysicalSource -------------------------------------------------------------------

    def chunks_for(self, nbytes: int) -> int:
        return max(1, math.ceil(int(nbytes) / self.chunk_bytes))

    def acquire(self, nbytes: int, deadline_s: float, prefer: Sequence[int] = ()) -> PhysicalLease:
        """Lease whole chunks covering ``nbytes``; waits up to ``deadline_s``, then
        ``ContextMemoryUnavailable``. The pieces may cover more than ``nbytes`` (by under
        one chunk); the arena maps only what it asked for. ``prefer``: the chunks the
        caller still has mapped, by position (see ``LeaseTable.lease``)."""
        table = self.table
        if table is None:
            raise EbbInternalError(f"{self.where} client is closed")
        n = self.chunks_for(nbytes)
        indices = self._lease(table, n, deadline_s, prefer)
        try:
            with self._lock:
                self._drop_retired_locked()
                stale = [i for i in indices
                         if i not in self._handles or self._handles[i][0] != table.chunk_generation(i)]
                if stale:
                    self._fetch_locked(stale)
                pieces = [(self._handles[i][1], self.chunk_bytes) for i in indices]
        except BaseException:
            table.give_back(indices)
            raise
        return PhysicalLease(pieces, n * self.chunk_bytes, self._give_back, token=indices)

    def _lease(self, table: LeaseTable, n: int, deadline_s: float, prefer: Sequence[int] = ()) -> list[int]:
        if n > self.grow_limit_chunks:
            return table.lease(n, deadline_s, prefer)
        deadline = time.monotonic() + deadline_s
        while True:
            if table.capacity < n:
                grown = self.resize(n)
                logger.info("%s: grew to %d chunk(s) to fit a lease of %d", self.where, grown["capacity"], n)
                if grown["capacity"] < n:  # the card had no room: the table refuses at once, with the figures
                    return table.lease(n, 0.0)
            try:
                return table.lease(n, max(0.0, deadline - time.monotonic()), prefer)
            except ContextMemoryUnavailable:
                # A concurrent resize (the coordinator's target) may have shrunk the pool
                # between our growth and our lease: grow again while time remains.
                if table.capacity >= n or time.monotonic() >= deadline:
                    raise

    def _give_back(self, lease: PhysicalLease) -> None:
        table = self.table
        if table is None:
            raise EbbInternalError(f"{self.where}: lease of chunks {lease.token} released after close()")
        table.give_back(lease.token)

    def snapshot(self) -> TableSnapshot:
        if self.table is None:
            raise EbbInternalError(f"{self.where} client is closed")
        return self.table.snapshot()

    @property
    def imported_chunks(self) -> list[int]:
        with self._lock:
            return sorted(self._handles)

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Release every imported handle and leave the pool; idempotent.

        Leases still held by this process stay in the table until given back or until
        the process exits (then they are reclaimed); a mapped chunk keeps its memory
        until unmapped, whatever happens to the handle.
        """
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        self._watcher = None
        with self._lock:
            if self._handles:
                with self._cuda.device(self.device):
                    for _, handle in self._handles.values():
                        self._cuda.mem_release(handle)
                self._handles.clear()
            if self.table is not None:
                held = self.table.held_by(os.getpid())
                if held:
                    logger.warning("%s: closing with chunks %s still leased by this process", self.where, held)
                self.table.close()
                self.table = None
            self._sock.close()

    def __enter__(self) -> PoolPhysical:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- starting the owner ------------------------------------------------------------------


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
    cmd = [sys.executable, "-m", "engine_runtime.pool", "--gpu-uuid", gpu_uuid, "--chunk-bytes", str(chunk_bytes),
           "--initial-chunks", str(initial_chunks), "--directory", str(paths.socket.parent), "--detach"]
    if idle_exit_s is not None:
        cmd += ["--idle-exit-s", str(idle_exit_s)]
    if max_chunks is not None:
        cmd += ["--max-chunks", str(max_chunks)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # so `-m engine_runtime.pool` imports this copy
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


# --- the owner process ---------------------------------------------------------------------


def _device_of(gpu_uuid: str) -> int:
    from engine_runtime import _cuda

    err, count = _cuda.runtime().cudaGetDeviceCount()
    if int(err) != 0:
        raise PoolUnavailableError(f"cudaGetDeviceCount failed ({err})", gpu_uuid)
    seen = [_cuda.device_uuid(i) for i in range(count)]
    if gpu_uuid not in seen:
        raise PoolUnavailableError(f"GPU not visible here; visible: {seen}", gpu_uuid)
    return seen.index(gpu_uuid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Own one GPU's context-memory pool and serve it to replicas.")
    parser.add_argument("--gpu-uuid", required=True, help="GPU-xxxxxxxx-... as NVML prints it")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--initial-chunks", type=int, default=0)
    parser.add_argument("--max-chunks", type=int, default=None, help="table slots (default: card memory / chunk)")
    parser.add_argument("--directory", default=None, help="where the socket, table and log live")
    parser.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long with no replica")
    parser.add_argument("--detach", action="store_true", help="double-fork into a daemon first")
    args = parser.parse_args(argv)
    if args.detach:
        # Fork before touching CUDA (a CUDA context does not survive fork); the launcher
        # exits at once so its parent can reap it; the daemon leads a new session.
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s pool[{os.getpid()}] %(levelname)s %(message)s")
    paths = PoolPaths.for_gpu(args.gpu_uuid, args.directory)
    try:
        device = _device_of(args.gpu_uuid)
        from engine_runtime import _cuda

        _bind_device(_cuda, device)
        with _cuda.device(device):
            pool = ContextPool(device, args.gpu_uuid, args.chunk_bytes, args.initial_chunks, paths.socket,
                               table_path=paths.table, max_chunks=args.max_chunks, idle_exit_s=args.idle_exit_s)
            with pool:
                signal.signal(signal.SIGTERM, lambda *_: pool.stop())
                signal.signal(signal.SIGINT, lambda *_: pool.stop())
                pool.serve_forever()
    except PoolUnavailableError as err:
        logger.error("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
