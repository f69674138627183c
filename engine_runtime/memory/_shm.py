"""The one shared-memory primitive under both cross-process tables of context memory.

``SharedBudget`` (:mod:`engine_runtime.memory.admission`, bytes per GPU) and
``LeaseTable`` (:mod:`engine_runtime.memory.pool._lease_table`, chunks per GPU) keep
their own layouts and rules; what they share lives here, once:

* **The file** (:class:`SharedFile`): mapped by every process of the GPU. Created with
  ``O_EXCL`` and opened with ``O_NOFOLLOW``, and refused unless it is a regular file
  of this process's user that no other user may write: the tables steer GPU memory,
  so a file planted in ``/dev/shm`` by someone else must not be trusted.
* **The lock a dead holder cannot keep**: ``flock`` on the file, which the kernel
  drops with the holder's descriptors. ``flock`` belongs to an open file description,
  which the threads of one process share, so a ``threading.Lock`` is taken first; a
  forked child reopens the file so that parent and child never share a description
  (and hence a lock).
* **Liveness** (:func:`process_alive`): holders are recorded as (pid, process start
  time), so a pid reused by a new process does not inherit a dead one's bytes, and a
  zombie counts as dead.
* **The fair queue** (:class:`TicketQueue`, :func:`wait_in_line`): waiters take
  tickets; only the oldest live one may take, and nobody takes the fast path while
  anyone waits, so a large request is not starved by a stream of small ones (the
  price: a small request waits behind a large one). Waiting polls with a back-off
  (doubling, capped), because a process-shared condition variable would need a C
  extension and a request that has to wait is waiting for another call to end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from engine_runtime.errors import EbbError, EbbInternalError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A process as the tables record it: (pid, start time in clock ticks since boot).
Proc = tuple[int, int]


class SharedMemoryFileError(EbbError):
    """A shared-memory table's file cannot be used (not ours, wrong size or layout, full)."""

    #: How the message names the file.
    what = "shared-memory file"

    def __init__(self, path: str, why: str):
        self.path = str(path)
        self.why = why
        super().__init__(f"{self.what} {path}: {why}")


# --- liveness -------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2:].split()
    if len(rest) <= 19:
        return None
    return rest[0], int(rest[19])


def process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where /proc cannot say)."""
    stat_ = _proc_stat(pid)
    return stat_[1] if stat_ else 0


def process_alive(pid: int, start: int) -> bool:
    """True while ``pid`` runs and is the same process that started at ``start`` (0: any)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive, and its /proc/stat is still readable
    stat_ = _proc_stat(pid)
    if stat_ is None:
        return True  # no /proc: the signal test is all there is
    state, started = stat_
    if state in (b"Z", b"X"):
        return False  # exited, not yet reaped by its parent: it holds nothing any more
    return start == 0 or started == start


def this_process() -> Proc:
    pid = os.getpid()
    return pid, process_start(pid)


def dead_among(procs: Iterable[Proc], me: Proc) -> set[Proc]:
    """The processes of ``procs`` that are gone (``me`` never is; our pid with another
    start time is a process before us that had this pid)."""
    return {p for p in procs if p != me and not process_alive(*p)}


# --- the file -------------------------------------------------------------------

#: This process's pid, kept current by a fork hook: ``SharedFile.lock`` compares it with
#: the pid that mapped the file on every call, and ``os.getpid()`` is a system call.
_pid_now = os.getpid()


def _after_fork_in_child() -> None:
    global _pid_now
    _pid_now = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_owned(fd: int, path: Path, error: type[SharedMemoryFileError]) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise error(str(path), "not a regular file; remove it")
    if st.st_uid != os.geteuid():
        raise error(str(path), f"owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}; "
                               f"another user's table is not trusted (remove it, or run as its owner)")
    if st.st_mode & 0o022:
        raise error(str(path), f"mode {stat.S_IMODE(st.st_mode):o} lets other users write it; "
                               f"expected 600 (remove it; Ebb creates its files 600)")
    return st


def open_existing(path: Path, error: type[SharedMemoryFileError] = SharedMemoryFileError) -> int:
    """A descriptor of ``path``: not through a symbolic link, ours, writable by us alone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise error(str(path), "is a symbolic link, not a table Ebb made; remove it") from err
        raise
    try:
        _check_owned(fd, path, error)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_or_create(path: Path, error: type[SharedMemoryFileError]) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    try:
        return open_existing(path, error)
    except FileNotFoundError:
        # Removed between the two opens (its last user left): make it afresh.
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _linked(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (its last user may have removed it)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def write_new(path: Path, size: int, fill: Callable[[mmap.mmap], None]) -> None:
    """Write a fresh zero-filled file of ``size`` bytes, ``fill`` it, then rename it to ``path``.

    A process opening ``path`` sees the old file or a complete new one; processes that
    had the old one mapped keep it (its memory lives until they unmap). The temporary
    name is random and created with ``O_EXCL``, so nobody can plant it in advance.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mm:
            fill(mm)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


class SharedFile:
    """A file mapped into this process, under the lock a dead holder cannot keep.

    ``attach(mm)`` builds the user's views of the mapping and checks its layout; it is
    called with the lock held, after every (re)mapping (the first open, and again in
    a forked child). ``detach()`` drops those views before the mapping closes.
    ``size``: create the file where it is missing, and make a zero-length one (its
    creator died before sizing it) that long; ``None``: the file must exist, mapped
    whole.
    """

    def __init__(self, path: str | os.PathLike[str], *, attach: Callable[[mmap.mmap], None],
                 detach: Callable[[], None], size: int | None = None,
                 error: type[SharedMemoryFileError] = SharedMemoryFileError) -> None:
        self.path = Path(path)
        self._attach, self._detach = attach, detach
        self._size = size
        self._error = error
        self._tlock = threading.Lock()
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._map()

    def _map(self) -> None:
        while True:
            fd = open_existing(self.path, self._error) if self._size is None else _open_or_create(self.path, self._error)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self._size is not None and not _linked(fd, self.path):
                    os.close(fd)  # its last user removed it while we opened it: open again
                    continue
                size = os.fstat(fd).st_size
                if self._size is not None:
                    if size == 0:
                        os.ftruncate(fd, self._size)
                        size = self._size
                    elif size != self._size:
                        raise self._error(str(self.path), f"size {size} bytes, expected {self._size}; "
                                                          f"remove the stale file")
                mm = mmap.mmap(fd, size)
                try:
                    self._attach(mm)
                except BaseException:
                    self._detach()
                    mm.close()
                    raise
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._mm, self._pid = fd, mm, os.getpid()
            return

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def fd(self) -> int:
        return self._fd

    def _after_fork(self) -> None:
        # A forked child shares the parent's open file description, hence its flock, and
        # may have inherited the thread lock held: a lock, descriptor and mapping of its own.
        self._tlock = threading.Lock()
        old_fd, old_mm = self._fd, self._mm
        self._detach()
        self._map()
        os.close(old_fd)
        with contextlib.suppress(BufferError):
            old_mm.close()

    def lock(self) -> None:
        """Take the thread lock, then the file lock. Not a generator context manager: the
        tables' hot paths call ``lock``/``unlock`` directly (a generator costs microseconds)."""
        if self._mm is None:
            raise EbbInternalError(f"shared-memory file {self.path} is closed")
        if _pid_now != self._pid:
            self._after_fork()
        self._tlock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._tlock.release()
            raise

    def unlock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def unlink_locked(self) -> bool:
        """Remove the file while holding the lock, if it is still the one at ``path``.
        A process that opened it meanwhile sees it unlinked once it has the lock, and
        opens (creates) it again."""
        if not _linked(self._fd, self.path):
            return False
        os.unlink(self.path)
        return True

    def close(self) -> None:
        """Drop the views, unmap and close; idempotent."""
        if self._mm is not None:
            self._detach()
            try:
                self._mm.close()
            except BufferError:
                logger.warning("shared-memory file %s still has views exported; leaving it mapped", self.path)
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def int64_column(mm: mmap.mmap, offset_bytes: int, length: int, stride_words: int = 1) -> np.ndarray:
    """``length`` int64 words of ``mm`` from ``offset_bytes``, every ``stride_words``-th."""
    return np.ndarray((length,), np.int64, buffer=mm, offset=offset_bytes, strides=(8 * stride_words,))


# --- the fair queue ----------------------------------------------------------------


class TicketQueue:
    """A waiting line in shared memory: four int64 columns (ticket, pid, start, wanted)
    of equal length, and two counters (the last ticket issued, the entries queued).

    Ticket 0 marks an empty entry; the ticket is written last and cleared first, so an
    entry is complete whenever it is there. Every method expects the lock held.
    """

    __slots__ = ("_counters", "_last_at", "_waiting_at", "ticket", "pid", "start", "wanted")

    def __init__(self, counters: np.ndarray, last_ticket_at: int, waiting_at: int, *, ticket: np.ndarray,
                 pid: np.ndarray, start: np.ndarray, wanted: np.ndarray) -> None:
        self._counters, self._last_at, self._waiting_at = counters, last_ticket_at, waiting_at
        self.ticket, self.pid, self.start, self.wanted = ticket, pid, start, wanted

    @property
    def waiting(self) -> int:
        return int(self._counters[self._waiting_at])

    def enqueue(self, me: Proc, wanted: int) -> int:
        """Queue ``me`` for ``wanted``; return its ticket, or 0 where every entry is taken."""
        empty = np.flatnonzero(self.ticket == 0)
        if len(empty) == 0:
            return 0
        c = self._counters
        ticket = int(c[self._last_at]) + 1
        c[self._last_at] = ticket
        c[self._waiting_at] += 1
        q = int(empty[0])
        self.pid[q], self.start[q], self.wanted[q] = me[0], me[1], wanted
        self.ticket[q] = ticket
        return ticket

    def _drop_rows(self, rows: np.ndarray) -> None:
        if len(rows):
            self.ticket[rows] = 0
            self._counters[self._waiting_at] = max(0, int(self._counters[self._waiting_at]) - len(rows))

    def dequeue(self, ticket: int) -> None:
        self._drop_rows(np.flatnonzero(self.ticket == ticket))

    def head(self) -> int:
        """The oldest ticket queued (0: nobody waits)."""
        if self.waiting == 0:
            return 0
        queued = self.ticket[self.ticket > 0]
        return int(queued.min()) if len(queued) else 0

    def ahead_of(self, ticket: int) -> int:
        """How many queued entries are older than ``ticket`` (0: it is the head)."""
        t = self.ticket
        return int(np.count_nonzero((t > 0) & (t < ticket)))

    def members(self) -> set[Proc]:
        rows = np.flatnonzero(self.ticket > 0)
        return set(zip(self.pid[rows].tolist(), self.start[rows].tolist(), strict=True))

    def drop(self, dead: set[Proc]) -> int:
        """Drop the entries of ``dead`` processes; return how many."""
        rows = np.flatnonzero(self.ticket > 0)
        if not len(rows) or not dead:
            return 0
        procs = zip(self.pid[rows].tolist(), self.start[rows].tolist(), strict=True)
        gone = rows[[p in dead for p in procs]]
        self._drop_rows(gone)
        return len(gone)


@dataclass(frozen=True)
class Backoff:
    """How a waiter polls: sleeps doubling from ``first_s`` up to ``max_s`` and, with
    ``per_place_s``, up to that times (1 + places ahead): the head of the line polls
    often (a sleeping head idles the whole line), those far behind rarely (they cannot
    go yet and would only contend for the lock). Dead holders and waiters are looked
    for every ``reap_every_s`` (a liveness check costs syscalls per process)."""

    first_s: float
    max_s: float
    reap_every_s: float
    per_place_s: float | None = None

    def next(self, sleep_s: float, place: int) -> float:
        cap = self.max_s if self.per_place_s is None else min(self.max_s, self.per_place_s * (1 + place))
        return min(sleep_s * 2, cap)


def wait_in_line(shm: SharedFile, queue: TicketQueue, ticket: int, *, until_s: float, backoff: Backoff,
                 turn: Callable[[int, float], T | None], reap: Callable[[], object]) -> T:
    """Wait with ``ticket`` (already queued) until ``turn`` answers.

    Under the lock, every poll: ``reap()`` where ``backoff.reap_every_s`` has passed,
    then ``turn(places_ahead, now_s)``, which returns what was taken (the wait ends),
    ``None`` (poll again) or raises (the wait is refused: deadline passed, request too
    large). The ticket leaves the queue however the wait ends, an interrupt included.
    """
    queued = True
    sleep_s = backoff.first_s
    last_reap = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            shm.lock()
            try:
                if now - last_reap >= backoff.reap_every_s:
                    reap()
                    last_reap = now
                place = queue.ahead_of(ticket)
                try:
                    got = turn(place, now)
                except BaseException:
                    queue.dequeue(ticket)
                    queued = False
                    raise
                if got is not None:
                    queue.dequeue(ticket)
                    queued = False
                    return got
            finally:
                shm.unlock()
            sleep_s = backoff.next(sleep_s, place)
            time.sleep(max(0.0, min(sleep_s, until_s - now)))
    finally:
        if queued:  # interrupted (KeyboardInterrupt, a signal handler's exception)
            with shm.locked():
                queue.dequeue(ticket)
