"""Admission control: a byte budget a dynamic call takes from before acquiring memory.

The engine layer depends only on the ``Admission`` protocol. ``UnboundedAdmission``
admits everything (a single process alone on its device). ``SharedBudget`` is one
GPU's budget shared by every process on the node that serves from that GPU (Serve
replicas are separate Ray workers): its state lives in a small memory-mapped file
named after the GPU's UUID, guarded by ``flock`` so that a holder killed mid-update
cannot keep the lock (the kernel drops it with the process's descriptors), and every
reservation is recorded under its process id so bytes held by a process that died
are given back.

The later per-GPU context pool (a lease table in shared memory) can implement the
same ``Admission`` protocol; the engines will not notice.
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
from typing import Protocol, runtime_checkable

from engine_runtime.errors import ContextMemoryUnavailable, EbbError, EbbInternalError
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)



@runtime_checkable
class Admission(Protocol):
    def reserve(self, nbytes: int, deadline_s: float) -> contextlib.AbstractContextManager[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block; raise
        ``ContextMemoryUnavailable`` if they cannot be had within ``deadline_s``."""
        ...


class UnboundedAdmission:
    """Admits every request at once; for engines with no shared budget."""

    @contextlib.contextmanager
    def reserve(self, nbytes: int, deadline_s: float) -> Iterator[None]:
        yield


class SharedBudgetError(EbbError):
    """The shared budget's file cannot be used (wrong layout, holder table full)."""

    def __init__(self, path: str, why: str):
        self.path = path
        super().__init__(f"shared admission budget {path}: {why}")


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


# -- the shared file ----------------------------------------------------------------
# Little-endian int64 words, so a ``memoryview.cast('q')`` reads them without struct.
_MAGIC = 0x45424242554447  # "EBBBUDG"
_VERSION = 1
_W_MAGIC, _W_VERSION, _W_CAPACITY, _W_USED, _W_NEXT_TICKET, _W_WAITERS, _W_PEAK = range(7)
# _W_PEAK took a spare header word (files made before it read 0 there), so the layout
# and its version are unchanged.
_HEADER_WORDS = 8
#: ``_W_CAPACITY`` value meaning "never set": admit everything until the coordinator says.
_UNSET = -1
#: Holder slots: (pid, process start time, bytes held). One per process, not per call,
#: so the table is bounded by the number of replica processes on one GPU.
_SLOTS = 256
_SLOT_WORDS = 3
#: Waiter entries: (pid, process start time, ticket, bytes wanted). One per queued call.
_WAITERS = 512
_WAITER_WORDS = 4
_SLOTS_AT = _HEADER_WORDS
_WAITERS_AT = _SLOTS_AT + _SLOTS * _SLOT_WORDS
_FILE_WORDS = _WAITERS_AT + _WAITERS * _WAITER_WORDS
_FILE_BYTES = _FILE_WORDS * 8

#: Waiting polls the shared state with sleeps that double from the first value up to a
#: cap that grows with the place in line: the head of the line polls often (it is the
#: only one that may go, and a sleeping head idles the whole line), those far behind
#: rarely (they cannot go yet and would only contend for the lock).
_BACKOFF_FIRST_S = 25e-6
_BACKOFF_PER_PLACE_S = 100e-6
_BACKOFF_MAX_S = 2e-3
#: How often a waiter scans for dead holders: liveness checks cost a syscall per process.
_REAP_EVERY_S = 20e-3


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where /proc cannot say).

    Recorded beside the pid so that a pid reused by a new process is not mistaken
    for the dead holder that had it.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else 0


def _alive(pid: int, start_time: int) -> bool:
    """Whether ``pid`` is still the process that registered with ``start_time``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc to say more; the kill probe said it exists
    fields = stat[stat.rfind(b")") + 2 :].split()
    # A zombie still answers kill(0) but has closed its files and holds nothing.
    if fields and fields[0] in (b"Z", b"X"):
        return False
    return not (start_time and len(fields) > 19 and int(fields[19]) != start_time)


def budget_path(key: str, directory: str = "/dev/shm") -> str:
    """The file that holds ``key``'s budget. UUIDs are kept readable; a hash of the
    raw key keeps two keys that sanitise alike (``MIG-…/1/0`` vs ``MIG-…_1_0``) apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:96]
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return os.path.join(directory, f"ebb-budget-{safe}-{digest}")


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
      can serve before the coordinator is up. Once set, it persists in the file, also
      across a coordinator restart.
    """

    def __init__(self, key: str, capacity_bytes: int | None = None, directory: str = "/dev/shm") -> None:
        self.key = key
        self.path = budget_path(key, directory)
        self._thread_lock = threading.Lock()
        self._pid = -1
        self._open()
        if capacity_bytes is not None:
            self.set_capacity(capacity_bytes)

    # -- file handling --------------------------------------------------------------

    def _open(self) -> None:
        """(Re)open the file in this process. After ``fork`` the child must not share
        the parent's open file description, or the two would share one ``flock``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    os.ftruncate(fd, _FILE_BYTES)
                elif size != _FILE_BYTES:
                    raise SharedBudgetError(self.path, f"size {size} bytes, expected {_FILE_BYTES}; remove the stale file")
                mm = mmap.mmap(fd, _FILE_BYTES)
                words = memoryview(mm).cast("q")
                # All zeros: fresh, or its creator died between truncating and writing.
                if words[_W_MAGIC] == 0 and words[_W_VERSION] == 0:
                    words[_W_VERSION] = _VERSION
                    words[_W_CAPACITY] = _UNSET
                    words[_W_MAGIC] = _MAGIC
                elif words[_W_MAGIC] != _MAGIC or words[_W_VERSION] != _VERSION:
                    magic, version = words[_W_MAGIC], words[_W_VERSION]
                    words.release()
                    mm.close()
                    raise SharedBudgetError(
                        self.path, f"magic 0x{magic:x} version {version}, expected 0x{_MAGIC:x} version {_VERSION}"
                    )
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._mm = mm
        self._w = words
        self._pid = os.getpid()
        self._start = _start_time(self._pid)
        self._slot = -1

    def _reopen_after_fork(self) -> None:
        # The inherited descriptor shares the parent's open file description, hence
        # its flock: a forked child takes a descriptor and mapping of its own.
        self._w.release()
        self._mm.close()
        os.close(self._fd)
        self._open()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[memoryview]:
        w = self._lock()
        try:
            yield w
        finally:
            self._unlock()

    def close(self) -> None:
        """Unmap and close this process's handle (the budget itself stays)."""
        with self._thread_lock:
            if self._fd < 0:
                return
            self._w.release()
            self._mm.close()
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the budget's file (tests, benchmarks; a node's budget normally lives on)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- table helpers (caller holds the lock) ----------------------------------------

    def _my_slot(self, w: memoryview) -> int:
        s = self._slot
        if s >= 0:
            base = _SLOTS_AT + s * _SLOT_WORDS
            if w[base] == self._pid and w[base + 1] == self._start:
                return s
        free = -1
        for i in range(_SLOTS):
            base = _SLOTS_AT + i * _SLOT_WORDS
            pid = w[base]
            if pid == self._pid and w[base + 1] == self._start:
                self._slot = i
                return i
            if free < 0 and pid == 0:
                free = i
        if free < 0:
            self._reap(w)
            free = next((i for i in range(_SLOTS) if w[_SLOTS_AT + i * _SLOT_WORDS] == 0), -1)
            if free < 0:
                raise SharedBudgetError(self.path, f"all {_SLOTS} holder slots are taken by live processes")
        base = _SLOTS_AT + free * _SLOT_WORDS
        w[base + 1] = self._start
        w[base + 2] = 0
        w[base] = self._pid
        self._slot = free
        return free

    def _dead(self, pid: int, start_time: int) -> bool:
        if pid == self._pid:
            # Our pid with another start time: a process before us had this pid and died.
            return start_time != self._start
        return not _alive(pid, start_time)

    def _reap(self, w: memoryview) -> int:
        """Give back bytes and queue places of dead processes; return bytes reclaimed."""
        reclaimed = 0
        for i in range(_SLOTS):
            base = _SLOTS_AT + i * _SLOT_WORDS
            pid = w[base]
            if pid and self._dead(pid, w[base + 1]):
                held = w[base + 2]
                reclaimed += held
                w[_W_USED] = max(0, w[_W_USED] - held)
                w[base], w[base + 1], w[base + 2] = 0, 0, 0
                if held:
                    logger.warning(
                        "budget %s: reclaimed %.1f MiB held by dead process %d", self.key, held / MiB, pid
                    )
        for i in range(_WAITERS):
            base = _WAITERS_AT + i * _WAITER_WORDS
            pid = w[base]
            if pid and self._dead(pid, w[base + 1]):
                w[base], w[base + 1], w[base + 2], w[base + 3] = 0, 0, 0, 0
                w[_W_WAITERS] = max(0, w[_W_WAITERS] - 1)
        return reclaimed

    def _enqueue(self, w: memoryview, nbytes: int) -> int:
        for i in range(_WAITERS):
            base = _WAITERS_AT + i * _WAITER_WORDS
            if w[base] == 0:
                ticket = w[_W_NEXT_TICKET] + 1
                w[_W_NEXT_TICKET] = ticket
                w[base + 1], w[base + 2], w[base + 3] = self._start, ticket, nbytes
                w[base] = self._pid
                w[_W_WAITERS] += 1
                return i
        raise SharedBudgetError(self.path, f"more than {_WAITERS} requests queued")

    def _dequeue(self, w: memoryview, entry: int) -> None:
        base = _WAITERS_AT + entry * _WAITER_WORDS
        w[base], w[base + 1], w[base + 2], w[base + 3] = 0, 0, 0, 0
        w[_W_WAITERS] = max(0, w[_W_WAITERS] - 1)

    @staticmethod
    def _place(w: memoryview, ticket: int) -> int:
        """How many queued requests are ahead of ``ticket`` (0: it is the head)."""
        tickets = w[_WAITERS_AT + 2 : _FILE_WORDS : _WAITER_WORDS].tolist()
        pids = w[_WAITERS_AT:_FILE_WORDS:_WAITER_WORDS].tolist()
        return sum(1 for p, t in zip(pids, tickets) if p and t < ticket)

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
                    "budget %s: releasing %d bytes but process %d holds %d; clamping", self.key, nbytes, self._pid, held
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
        # flock is per open file description, so threads of one process would all
        # "hold" it at once: a thread lock serialises them first. Inlined rather than
        # a generator context manager: this is the admission hot path.
        self._thread_lock.acquire()
        try:
            if self._pid != os.getpid():
                self._reopen_after_fork()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self._w

    def _unlock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

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
            entry = self._enqueue(w, nbytes)
            ticket = w[_WAITERS_AT + entry * _WAITER_WORDS + 2]
        in_line = True
        sleep_s = _BACKOFF_FIRST_S
        last_reap = t0
        try:
            while True:
                now = time.monotonic()
                with self._locked() as w:
                    if now - last_reap >= _REAP_EVERY_S:
                        self._reap(w)
                        last_reap = now
                    cap = w[_W_CAPACITY]
                    place = self._place(w, ticket)
                    if (cap == _UNSET or w[_W_USED] + nbytes <= cap) and place == 0:
                        self._take(w, nbytes)
                        self._dequeue(w, entry)
                        in_line = False
                        waited = time.monotonic() - t0
                        if waited > 0.01:
                            logger.debug("budget %s: admitted %.1f MiB after %.0f ms", self.key, nbytes / MiB, waited * 1e3)
                        return
                    err = self._too_large(w, nbytes, t0)
                    if err is None and now >= end:
                        err = ContextMemoryUnavailable(nbytes, max(0, cap - w[_W_USED]), now - t0, where=self.key)
                    if err is not None:
                        self._dequeue(w, entry)
                        in_line = False
                        logger.info("budget %s: refused %.1f MiB: %s", self.key, nbytes / MiB, err)
                        raise err
                sleep_s = min(sleep_s * 2, _BACKOFF_PER_PLACE_S * (1 + place), _BACKOFF_MAX_S)
                time.sleep(min(sleep_s, max(0.0, end - now)))
        finally:
            if in_line:
                # Interrupted while queued (KeyboardInterrupt, a signal): leave the line.
                with self._locked() as w:
                    self._dequeue(w, entry)

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
