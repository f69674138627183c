"""One pool of context memory per GPU, lent to whichever replica process is running a call.

Physical memory is premade in chunks (CUDA VMM, exportable as POSIX file
descriptors) by one **owner** process per GPU per node (:class:`ContextPool`). Each
replica process connects once over a Unix domain socket, receives every chunk's
descriptor (``SCM_RIGHTS``), imports them and closes the descriptors
(:class:`PoolPhysical`). From then on a lease is a choice of chunk indices in a
shared-memory lease table (:mod:`engine_runtime.memory.pool._lease_table`): no descriptor traffic
and no round trip to the owner per call. A replica's ``VmmArena`` maps the leased
chunks at its stable address for the call, unmaps them, and gives them back. Context
memory on the card then scales with the calls running at once, not with the replicas.

Who owns what
    The owner creates and releases chunks and is the only process that changes the
    pool's size. It is a daemon of its own (started detached by the first replica on
    the GPU through :func:`connect_or_start`, ``python -m engine_runtime.memory.pool``), so a
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

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

from engine_runtime.errors import EbbInternalError, PoolUnavailableError
from engine_runtime.memory.pool._lease_table import ChunkState, LeaseTable, ResizePlan
from engine_runtime.memory.pool._wire import (_FDS_PER_MESSAGE, _HOUSEKEEPING_S,
                                              _recv, _send)
from engine_runtime.units import GiB, MiB

logger = logging.getLogger(__name__)


# --- the owner ----------------------------------------------------------------------


class ContextPool:
    """The owner of one GPU's pool: creates chunks, lends their descriptors, resizes.

    Runs in its own process (``python -m engine_runtime.memory.pool``); :meth:`serve_forever`
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

    def grow_to_fit(self, nchunks: int) -> dict[str, Any]:
        """Grow (never shrink) so that a lease of ``nchunks`` finds them free.

        What replicas ask for a lease the pool cannot grant now: the owner, which serves
        one request at a time, computes the growth from the table as it is, so two
        replicas growing at once add up instead of each setting an absolute size read
        a moment earlier (which shrank the other's growth). Shrinking is left to
        :meth:`resize` (the coordinator's target): free chunks retire at once, leased
        ones drain when given back, so a shrink never takes a chunk from its holder.
        """
        snap = self.table.snapshot()
        st = snap.states
        live = st["FREE"] + st["LEASED"] + st["DRAINING"] + st["CREATING"]
        short = int(nchunks) - (st["FREE"] + st["CREATING"])
        if short <= 0:
            return {"capacity": snap.capacity, "created": 0, "retired": 0, "draining": 0, "revived": 0,
                    "pool_bytes": len(self._handles) * self.chunk_bytes, "error": ""}
        # Growing revives draining chunks first (still held: no free chunk comes of them),
        # so they are counted in the new size along with the shortfall.
        return self.resize(live + short)

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
            elif op == "grow":
                _send(conn, {"ok": True, **self.grow_to_fit(int(request["fit_chunks"]))})
            elif op == "shutdown":
                _send(conn, {"ok": True})
                self._stop.set()
            else:
                raise ValueError(f"unknown pool request {op!r}; expected hello, fetch, resize, grow or shutdown")
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
