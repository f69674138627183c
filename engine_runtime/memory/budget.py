"""``SharedBudget``: one GPU's admission budget, shared by every process on the node.

Serve replicas are separate Ray workers, so the budget lives in a small file in
``/dev/shm`` named after the GPU (:func:`budget_path`), mapped by each of them, on the
shared-memory primitive of :mod:`engine_runtime.memory._shm`: the lock a killed holder
cannot keep, holders recorded by (pid, start time) so the bytes of a process that died
are given back, and a fair ticket queue. This module adds the budget's own layout
(capacity, bytes used, a holder slot per process) and rules (``SharedBudget``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError
from engine_runtime.memory._shm import (
    Backoff,
    Proc,
    SharedFile,
    SharedMemoryFileError,
    TicketQueue,
    dead_among,
    int64_column,
    open_existing,
    this_process,
    wait_in_line,
)
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


class SharedBudgetError(SharedMemoryFileError):
    """The shared budget's file cannot be used (not ours, wrong layout, holder table full)."""

    what = "shared admission budget"


@dataclass(frozen=True)
class BudgetSnapshot:
    """The budget at one moment, after dead processes' bytes were reclaimed."""

    key: str
    #: ``None`` while no capacity was ever set (every request is admitted).
    capacity_bytes: int | None
    used_bytes: int
    #: Bytes held per live process id (processes holding nothing are left out).
    holders: dict[int, int]
    #: Requests queued (waiting for bytes or for their turn).
    waiters: int
    #: Bytes reclaimed from dead processes by this snapshot.
    reclaimed_bytes: int
    #: The most bytes ever held at once since the file was made or ``reset_peak()``.
    peak_used_bytes: int = 0
    #: Ids of the processes with a request queued, sorted (each once, however many it queued).
    waiting_pids: tuple[int, ...] = ()


# -- the shared file ----------------------------------------------------------------
# Little-endian int64 words, so a ``memoryview.cast('q')`` reads them without struct.
_MAGIC = 0x45424242554447  # "EBBBUDG"
_VERSION = 1
_W_MAGIC, _W_VERSION, _W_CAPACITY, _W_USED, _W_LAST_TICKET, _W_WAITERS, _W_PEAK = range(7)
# _W_PEAK took a spare header word (files made before it read 0 there), so the layout
# and its version are unchanged.
_HEADER_WORDS = 8
#: ``_W_CAPACITY`` value meaning "never set": admit everything until the coordinator says.
_UNSET = -1
#: Holder slots: (pid, process start time, bytes held). One per process, not per call,
#: so the table is bounded by the number of replica processes on one GPU.
_SLOTS = 256
_SLOT_WORDS = 3
#: Waiter entries: (pid, process start time, ticket, bytes wanted). One per queued call;
#: ticket 0 marks an empty entry.
_WAITERS = 512
_WAITER_WORDS = 4
_SLOTS_AT = _HEADER_WORDS
_WAITERS_AT = _SLOTS_AT + _SLOTS * _SLOT_WORDS
_FILE_WORDS = _WAITERS_AT + _WAITERS * _WAITER_WORDS
_FILE_BYTES = _FILE_WORDS * 8

#: Waiting (``_shm.Backoff``): the head of the line polls every 25 µs at first, those
#: behind it less often the further back they are (100 µs per place, 2 ms at most);
#: dead holders are looked for every 20 ms.
_BACKOFF = Backoff(first_s=25e-6, per_place_s=100e-6, max_s=2e-3, reap_every_s=20e-3)
#: File names: the user id follows, then the key (see ``budget_path``).
_PREFIX = "ebb-budget-u"


def budget_path(key: str, directory: str = "/dev/shm") -> str:
    """The file that holds ``key``'s budget. UUIDs are kept readable; a hash of the
    raw key keeps two keys that sanitise alike (``MIG-…/1/0`` vs ``MIG-…_1_0``) apart,
    and the user id keeps two users of one host apart (each trusts only its own files)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:96]
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return os.path.join(directory, f"{_PREFIX}{os.geteuid()}-{safe}-{digest}")


#: Open handles per (process, file): a process has one holder slot per budget however
#: many handles it opens, and leaves the slot when it closes its last one.
_handles: dict[tuple[int, str], int] = {}
_handles_lock = threading.Lock()


def _users(w: memoryview) -> list[Proc]:
    return [(w[b], w[b + 1]) for b in range(_SLOTS_AT, _WAITERS_AT, _SLOT_WORDS) if w[b]]


def remove_unused_budgets(directory: str = "/dev/shm") -> list[str]:
    """Remove this user's budget files that no live process uses; return their paths.

    The files of a cluster whose processes were all killed (``ray stop``, a crash)
    have nobody left to remove them; a replica starting on the node removes them.
    A budget some live process holds open is kept, whatever its key.
    """
    removed = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(f"{_PREFIX}{os.geteuid()}-"))
    except OSError:
        return removed
    me = this_process()
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = open_existing(Path(path), SharedBudgetError)
        except (OSError, SharedBudgetError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Zero length: its creator is sizing it (under this lock) or died doing so.
            if os.fstat(fd).st_size != _FILE_BYTES:
                continue
            with mmap.mmap(fd, _FILE_BYTES) as mm:
                w = memoryview(mm).cast("q")
                users = set(_users(w))
                waiting = w[_W_WAITERS]
                w.release()
            if waiting == 0 and len(dead_among(users, me)) == len(users) and me not in users:
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
                    removed.append(path)
        except OSError as err:
            logger.debug("budget %s not swept: %s", path, err)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d budget file(s) nobody uses: %s", len(removed), removed)
    return removed


class SharedBudget:
    """One GPU's admission budget, shared by every process on the node.

    Policy, in short:

    * **Fast path**: with nobody queued and room in the budget, a reservation takes
      its bytes at once (one ``flock``, a few word updates, one ``flock`` release).
    * **Fairness**: otherwise the request takes a ticket and waits in line; only the
      oldest live ticket may take bytes, so a large request is never overtaken forever
      by small ones that keep fitting. Small requests queued behind it wait with it:
      that is the price of not starving it.
    * **Too large**: a request larger than the whole capacity fails at once instead of
      waiting for its deadline. Waiting would hold the head of the line and stall every
      smaller call behind it, and the coordinator raises capacity only when pressure
      falls, which is not something to block a call on; HTTP 503 with ``Retry-After``
      is the honest answer. The same holds for a queued request when the capacity
      shrinks below its size.
    * **Shrinking** (``set_capacity`` lower than what is held): holders keep their
      bytes; new requests wait until enough is released.
    * **Dead processes**: bytes and queue places of processes that died are reclaimed
      when a request has to wait and on every ``snapshot()``.
    * **Capacity never set** (``capacity_bytes=None`` on a fresh file): everything is
      admitted (and still recorded) until the coordinator sets a capacity, so replicas
      can serve before the coordinator is up. Once set, it lives in the file.
    * **The file's life**: every process that opens the budget registers in a holder
      slot. The last one to ``close()`` removes the file, and a file whose users all
      died is removed by the next close or by :func:`remove_unused_budgets`. Kept on
      purpose: the file (and the capacity in it) while any live process has it open,
      so a coordinator restart, which never opens it, loses nothing; and slots of
      processes that died without closing, until someone reaps them.
    """

    def __init__(self, key: str, capacity_bytes: int | None = None, directory: str = "/dev/shm") -> None:
        self.key = key
        self.path = budget_path(key, directory)
        self._w: memoryview | None = None
        self._queue: TicketQueue | None = None
        self._slot = -1
        self._me = this_process()
        self._closed = False
        self._shm = SharedFile(self.path, size=_FILE_BYTES, attach=self._attach, detach=self._detach,
                               error=SharedBudgetError)
        if capacity_bytes is not None:
            self.set_capacity(capacity_bytes)

    # -- file handling --------------------------------------------------------------

    def _attach(self, mm: mmap.mmap) -> None:
        """Views of a new mapping, with the lock held: check (or write) the header and
        register this process (a forked child registers as itself)."""
        words = memoryview(mm).cast("q")
        self._w = words
        # All zeros: fresh, or its creator died between truncating and writing.
        if words[_W_MAGIC] == 0 and words[_W_VERSION] == 0:
            words[_W_VERSION] = _VERSION
            words[_W_CAPACITY] = _UNSET
            words[_W_MAGIC] = _MAGIC
        elif words[_W_MAGIC] != _MAGIC or words[_W_VERSION] != _VERSION:
            raise SharedBudgetError(self.path, f"magic 0x{words[_W_MAGIC]:x} version {words[_W_VERSION]}, "
                                               f"expected 0x{_MAGIC:x} version {_VERSION}")
        waiters = _WAITERS_AT * 8
        self._queue = TicketQueue(
            int64_column(mm, 0, _HEADER_WORDS), _W_LAST_TICKET, _W_WAITERS,
            ticket=int64_column(mm, waiters + 16, _WAITERS, _WAITER_WORDS),
            pid=int64_column(mm, waiters, _WAITERS, _WAITER_WORDS),
            start=int64_column(mm, waiters + 8, _WAITERS, _WAITER_WORDS),
            wanted=int64_column(mm, waiters + 24, _WAITERS, _WAITER_WORDS))
        self._me = this_process()
        self._slot = -1
        self._my_slot(words)
        self._handle_key = (self._me[0], self.path)
        with _handles_lock:
            _handles[self._handle_key] = _handles.get(self._handle_key, 0) + 1

    def _detach(self) -> None:
        self._queue = None
        if self._w is not None:
            self._w.release()
            self._w = None

    def close(self) -> None:
        """Close this process's handle; the last handle of the last process removes the file."""
        if self._closed:
            return
        self._closed = True
        with _handles_lock:
            left = _handles.get(self._handle_key, 1) - 1
            if left:
                _handles[self._handle_key] = left
            else:
                _handles.pop(self._handle_key, None)
        if self._shm.closed:
            return
        if os.getpid() == self._me[0] and not left:
            w = self._lock()
            try:
                self._leave(w)
                self._reap(w)
                if not _users(w) and w[_W_WAITERS] == 0 and self._shm.unlink_locked():
                    logger.info("budget %s: last user left, removed %s", self.key, self.path)
            finally:
                self._unlock()
        self._shm.close()

    def _leave(self, w: memoryview) -> None:
        if self._slot < 0:
            return
        base = _SLOTS_AT + self._slot * _SLOT_WORDS
        if w[base] != self._me[0] or w[base + 1] != self._me[1]:
            return
        if w[base + 2]:
            # A reservation outlives the handle (a bug of the caller): give its bytes back.
            logger.error("budget %s: closed with %d bytes still held; giving them back", self.key, w[base + 2])
            w[_W_USED] = max(0, w[_W_USED] - w[base + 2])
        w[base], w[base + 1], w[base + 2] = 0, 0, 0
        self._slot = -1

    def unlink(self) -> None:
        """Remove the budget's file now, whoever uses it (tests, benchmarks)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- table helpers (caller holds the lock) ----------------------------------------

    def _my_slot(self, w: memoryview) -> int:
        s = self._slot
        pid, start = self._me
        if s >= 0:
            base = _SLOTS_AT + s * _SLOT_WORDS
            if w[base] == pid and w[base + 1] == start:
                return s
        free = -1
        for i in range(_SLOTS):
            base = _SLOTS_AT + i * _SLOT_WORDS
            if w[base] == pid and w[base + 1] == start:
                self._slot = i
                return i
            if free < 0 and w[base] == 0:
                free = i
        if free < 0:
            self._reap(w)
            free = next((i for i in range(_SLOTS) if w[_SLOTS_AT + i * _SLOT_WORDS] == 0), -1)
            if free < 0:
                raise SharedBudgetError(self.path, f"all {_SLOTS} holder slots are taken by live processes")
        base = _SLOTS_AT + free * _SLOT_WORDS
        w[base + 1] = start
        w[base + 2] = 0
        w[base] = pid
        self._slot = free
        return free

    def _reap(self, w: memoryview) -> int:
        """Give back bytes and queue places of dead processes; return bytes reclaimed."""
        dead = dead_among(set(_users(w)) | self._queue.members(), self._me)
        if not dead:
            return 0
        reclaimed = 0
        for base in range(_SLOTS_AT, _WAITERS_AT, _SLOT_WORDS):
            pid = w[base]
            if pid and (pid, w[base + 1]) in dead:
                held = w[base + 2]
                reclaimed += held
                w[_W_USED] = max(0, w[_W_USED] - held)
                w[base], w[base + 1], w[base + 2] = 0, 0, 0
                if held:
                    logger.warning(
                        "budget %s: reclaimed %.1f MiB held by dead process %d", self.key, held / MiB, pid
                    )
        self._queue.drop(dead)
        return reclaimed

    def _take(self, w: memoryview, nbytes: int) -> None:
        base = _SLOTS_AT + self._my_slot(w) * _SLOT_WORDS
        w[base + 2] += nbytes
        used = w[_W_USED] + nbytes
        w[_W_USED] = used
        if used > w[_W_PEAK]:
            w[_W_PEAK] = used

    def _give_back(self, nbytes: int) -> None:
        w = self._lock()
        try:
            base = _SLOTS_AT + self._my_slot(w) * _SLOT_WORDS
            held = w[base + 2]
            if held < nbytes:
                # Only possible if someone reclaimed this live process's bytes: a bug.
                logger.error(
                    "budget %s: releasing %d bytes but process %d holds %d; clamping", self.key, nbytes,
                    self._me[0], held
                )
                nbytes = held
            w[base + 2] = held - nbytes
            w[_W_USED] = max(0, w[_W_USED] - nbytes)
        finally:
            self._unlock()

    # -- public surface -------------------------------------------------------------

    def reserve(self, nbytes: int, deadline_s: float) -> _Reservation:
        """Hold ``nbytes`` for the ``with`` block; wait up to ``deadline_s`` seconds.

        Raises ``ContextMemoryUnavailable(requested, free, waited, where=key)`` after
        the deadline, or at once when ``nbytes`` exceeds the whole capacity.
        """
        return _Reservation(self, int(nbytes), deadline_s)

    def _lock(self) -> memoryview:
        self._shm.lock()
        return self._w

    def _unlock(self) -> None:
        self._shm.unlock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[memoryview]:
        w = self._lock()
        try:
            yield w
        finally:
            self._unlock()

    def _acquire(self, nbytes: int, deadline_s: float) -> None:
        w = self._lock()
        try:
            cap = w[_W_CAPACITY]
            if cap == _UNSET or (w[_W_WAITERS] == 0 and w[_W_USED] + nbytes <= cap):
                self._take(w, nbytes)
                return
        finally:
            self._unlock()
        self._wait(nbytes, deadline_s)

    def _too_large(self, w: memoryview, nbytes: int, t0: float) -> ContextMemoryUnavailable | None:
        cap = w[_W_CAPACITY]
        if cap != _UNSET and nbytes > cap:
            return ContextMemoryUnavailable(
                nbytes, max(0, cap - w[_W_USED]), time.monotonic() - t0, where=f"{self.key} (capacity {cap} bytes)"
            )
        return None

    def _wait(self, nbytes: int, deadline_s: float) -> None:
        t0 = time.monotonic()
        end = t0 + max(0.0, deadline_s)
        with self._locked() as w:
            self._reap(w)
            err = self._too_large(w, nbytes, t0)
            if err is not None:
                raise err
            ticket = self._queue.enqueue(self._me, nbytes)
            if ticket == 0:
                raise SharedBudgetError(self.path, f"more than {_WAITERS} requests queued")

        def turn(place: int, now: float) -> bool | None:
            w = self._w
            cap = w[_W_CAPACITY]
            if (cap == _UNSET or w[_W_USED] + nbytes <= cap) and place == 0:
                self._take(w, nbytes)
                waited = time.monotonic() - t0
                if waited > 0.01:
                    logger.debug("budget %s: admitted %.1f MiB after %.0f ms", self.key, nbytes / MiB, waited * 1e3)
                return True
            err = self._too_large(w, nbytes, t0)
            if err is None and now >= end:
                err = ContextMemoryUnavailable(nbytes, max(0, cap - w[_W_USED]), now - t0, where=self.key)
            if err is not None:
                logger.info("budget %s: refused %.1f MiB: %s", self.key, nbytes / MiB, err)
                raise err
            return None

        wait_in_line(self._shm, self._queue, ticket, until_s=end, backoff=_BACKOFF, turn=turn,
                     reap=lambda: self._reap(self._w))

    def set_capacity(self, capacity_bytes: int) -> None:
        """Set the budget (the coordinator, from NVML). Lowering it below what is held
        takes nothing away: holders keep their bytes, new requests wait."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
        with self._locked() as w:
            old = w[_W_CAPACITY]
            w[_W_CAPACITY] = int(capacity_bytes)
            used = w[_W_USED]
        if old != capacity_bytes:
            logger.info(
                "budget %s: capacity %s -> %.1f MiB (%.1f MiB held)",
                self.key,
                "unset" if old == _UNSET else f"{old / MiB:.1f} MiB",
                capacity_bytes / MiB,
                used / MiB,
            )

    def reset_peak(self) -> None:
        """Restart the peak from what is held now (say, after the capacity changed)."""
        with self._locked() as w:
            w[_W_PEAK] = w[_W_USED]

    def snapshot(self) -> BudgetSnapshot:
        """Capacity, bytes held and holders by pid, after reclaiming dead processes."""
        with self._locked() as w:
            reclaimed = self._reap(w)
            holders = {}
            for i in range(_SLOTS):
                base = _SLOTS_AT + i * _SLOT_WORDS
                if w[base] and w[base + 2]:
                    holders[int(w[base])] = int(w[base + 2])
            cap = w[_W_CAPACITY]
            return BudgetSnapshot(
                key=self.key,
                capacity_bytes=None if cap == _UNSET else int(cap),
                used_bytes=int(w[_W_USED]),
                holders=holders,
                waiters=int(w[_W_WAITERS]),
                reclaimed_bytes=int(reclaimed),
                peak_used_bytes=int(w[_W_PEAK]),
                waiting_pids=tuple(sorted({pid for pid, _ in self._queue.members()})),
            )


class _Reservation:
    """Bytes held in a ``SharedBudget`` for one ``with`` block; release is idempotent."""

    __slots__ = ("_budget", "nbytes", "_deadline_s", "_entered", "_held")

    def __init__(self, budget: SharedBudget, nbytes: int, deadline_s: float) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self._deadline_s = deadline_s
        self._entered = False
        self._held = False

    def __enter__(self) -> None:
        if self._entered:
            raise EbbInternalError("a reservation is entered once; call reserve() again")
        self._entered = True
        if self.nbytes > 0:
            self._budget._acquire(self.nbytes, self._deadline_s)
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._budget._give_back(self.nbytes)

    def __exit__(self, *exc) -> None:
        self.release()
