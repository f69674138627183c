"""A replica's side of the pool: imports the chunks and leases them per call."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError, PoolUnavailableError
from engine_runtime.memory.modes import ContextMechanism
from engine_runtime.memory.physical import PhysicalLease
from engine_runtime.memory.pool._lease_table import ChunkState, LeaseTable, TableSnapshot
from engine_runtime.memory.pool._wire import (_recv, _send)
from engine_runtime.memory.pool.support import _bind_device, _ensure_context
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)

#: How long a standing lease waits before it asks the owner to grow again.
_STANDING_SLICE_S = 0.05


# --- the client ---------------------------------------------------------------------


class PoolPhysical:
    """A replica's view of its GPU's pool: a ``PhysicalSource`` for ``VmmArena``.

    ``acquire`` leases ``ceil(nbytes / chunk_bytes)`` chunks and returns their
    imported handles as the lease's pieces; releasing the lease (the arena does, after
    unmapping) gives them back. Static mode is a lease that is never released.

    ``grow_limit_chunks``: a lease of more chunks than the pool now has could never be
    granted (the table refuses it at once), so the client first asks the owner to grow
    to fit it, for leases of up to this many chunks (0: never). That lets a replica's
    first call run in a pool its coordinator sized before it knew that replica's
    context (empty, say, while no replica had loaded). A *standing* lease (static
    mode, graph capture at start) also grows the pool when too few chunks are free:
    waiting for chunks that other static replicas hold for good would only time out.
    Growth is asked of the owner as "fit a lease of n" (:meth:`grow_to_fit`), never as
    an absolute size, so replicas growing at once cannot shrink each other's growth.
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

    def grow_to_fit(self, nchunks: int) -> dict[str, Any]:
        """Ask the owner to grow (never shrink) so that ``nchunks`` chunks are free; returns what it did."""
        with self._lock:
            try:
                _send(self._sock, {"op": "grow", "fit_chunks": int(nchunks)})
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

    def acquire(self, nbytes: int, deadline_s: float, prefer: Sequence[int] = (),
                standing: bool = False) -> PhysicalLease:
        """Lease whole chunks covering ``nbytes``; waits up to ``deadline_s``, then
        ``ContextMemoryUnavailable``. The pieces may cover more than ``nbytes`` (by under
        one chunk); the arena maps only what it asked for. ``prefer``: the chunks the
        caller still has mapped, by position (see ``LeaseTable.lease``). ``standing``:
        held for long (static mode, capture), so the pool grows when too few are free."""
        table = self.table
        if table is None:
            raise EbbInternalError(f"{self.where} client is closed")
        n = self.chunks_for(nbytes)
        indices = self._lease(table, n, deadline_s, prefer, standing)
        try:
            with self._lock:
                self._drop_retired_locked()
                handles, size = self._handles, self.chunk_bytes
                pieces, stale = [], []
                for i in indices:
                    held = handles.get(i)
                    if held is None or held[0] != table.chunk_generation(i):
                        stale.append(i)
                    else:
                        pieces.append((held[1], size))
                if stale:
                    self._fetch_locked(stale)
                    pieces = [(handles[i][1], size) for i in indices]
        except PoolUnavailableError as err:
            # New chunks whose memory the (gone) owner can no longer send: no memory for
            # this call, which is a 503 to its caller, not a bug.
            table.give_back(indices)
            raise ContextMemoryUnavailable(n * self.chunk_bytes, 0, 0.0, f"{self.where} ({err.reason})") from err
        except BaseException:
            table.give_back(indices)
            raise
        return PhysicalLease(pieces, n * self.chunk_bytes, self._give_back, token=indices)

    def _lease(self, table: LeaseTable, n: int, deadline_s: float, prefer: Sequence[int] = (),
                standing: bool = False) -> list[int]:
        if n > self.grow_limit_chunks:
            return table.lease(n, deadline_s, prefer)
        start = time.monotonic()
        deadline = start + deadline_s
        while True:
            snap = table.snapshot() if standing else None
            if table.capacity < n or (snap is not None and snap.free_chunks < n):
                try:
                    grown = self.grow_to_fit(n)
                except PoolUnavailableError as err:
                    # No owner to grow the pool (it died; the next replica to start brings
                    # one back): lease from what there is, so the call waits and gets its
                    # 503 like any other that cannot have memory, not a 500.
                    logger.warning("%s: cannot grow the pool for a lease of %d chunk(s): %s", self.where, n, err)
                else:
                    log = logger.info if grown["created"] or grown["revived"] else logger.debug
                    log("%s: grew to %d chunk(s) to fit a%s lease of %d%s", self.where, grown["capacity"],
                        " standing" if standing else "", n, f" ({grown['error']})" if grown.get("error") else "")
            remaining = max(0.0, deadline - time.monotonic())
            try:
                # A standing lease waits in short slices: chunks it grew the pool by may be
                # taken first (by another replica starting, or retired by a concurrent
                # shrink to the coordinator's target), and then it grows again.
                return table.lease(n, min(remaining, _STANDING_SLICE_S) if standing else remaining, prefer)
            except ContextMemoryUnavailable as err:
                # A concurrent resize (the coordinator's target) may have shrunk the pool
                # between our growth and our lease: grow again while time remains.
                now = time.monotonic()
                if now >= deadline or (not standing and table.capacity >= n):
                    raise ContextMemoryUnavailable(err.requested_bytes, err.free_bytes, now - start,
                                                   err.where) from err
                if table.capacity < n:
                    # Refused at once: the card had no room for the growth. Ask again shortly.
                    time.sleep(min(_STANDING_SLICE_S, deadline - now))

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
