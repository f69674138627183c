"""The context pool's lease table: which process holds which chunk, in shared memory.

One file per GPU per node (under ``/dev/shm``, keyed by the GPU's UUID), mapped by the
pool's owner and by every replica process on that GPU. A lease is a choice of chunk
indices made under a lock, so no descriptor traffic and no owner round trip happens
per call. This module is the CPU-testable core of :mod:`engine_runtime.memory.pool`: it
knows nothing of CUDA; the owner turns its plans (chunks to create, chunks retired)
into driver calls.

The lock a dead holder cannot keep, holders as (pid, start time), the fair ticket
queue and its back-off are the shared-memory primitive of
:mod:`engine_runtime.memory._shm`, which the admission budget uses too. What is the
table's own:

* **Capacity** is the number of chunks that should exist. Shrinking retires free
  chunks first and marks leased ones *draining*: they stay with their holder until
  given back, then retire. Growing first revives draining and retired chunks, then
  asks the owner (``ResizePlan.to_create``) to create memory for empty slots.
* **Generation** counts creations and retirements, so a client can tell with one read
  whether any chunk it imported was retired or replaced; each slot also has its own
  generation, bumped when its memory is recreated.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError
from engine_runtime.memory._shm import (
    Backoff,
    SharedFile,
    TicketQueue,
    dead_among,
    int64_column,
    process_alive,
    process_start,
    this_process,
    wait_in_line,
    write_new,
)
from engine_runtime.units import MiB

__all__ = ["ChunkState", "LeaseTable", "ResizePlan", "TableSnapshot", "process_alive", "process_start"]

logger = logging.getLogger(__name__)


_MAGIC = 0x45424250_4F4F4C31  # "EBBPOOL1"
_VERSION = 1

# Header: int64 fields at fixed positions.
_H_MAGIC, _H_VERSION, _H_MAX, _H_CHUNK, _H_CAPACITY, _H_GENERATION = 0, 1, 2, 3, 4, 5
_H_LAST_TICKET, _H_NEXT_LEASE, _H_OWNER_PID, _H_QUEUE_SLOTS = 6, 7, 8, 9
_H_LEASES, _H_WAITS, _H_TIMEOUTS, _H_RECLAIMED, _H_OWNER_START, _H_WAITING = 10, 11, 12, 13, 14, 15
_HEADER_FIELDS = 16
_LABEL_BYTES = 128
_HEADER_BYTES = _HEADER_FIELDS * 8 + _LABEL_BYTES

# Chunk slots: state, pid, start, lease id, generation; one contiguous int64 array per
# field, because contiguous scans are the fast ones.
_CHUNK_FIELDS = 5
# Waiting-queue columns: ticket (0 = empty entry), pid, start, chunks wanted (``_shm.TicketQueue``).
_QUEUE_FIELDS = 4

#: Waiting: 0.1 ms doubling to 2 ms; dead holders and waiters looked for every 50 ms.
_BACKOFF = Backoff(first_s=0.0001, max_s=0.002, reap_every_s=0.05)


class ChunkState(enum.IntEnum):
    """Life of one chunk slot."""

    #: No physical memory behind this slot.
    ABSENT = 0
    #: Memory exists and nobody holds it.
    FREE = 1
    #: Held by a process.
    LEASED = 2
    #: Held, and retired as soon as it is given back (the pool shrank under it).
    DRAINING = 3
    #: Unheld and out of service; the owner will release its memory to the driver.
    RETIRED = 4
    #: The owner is creating its memory (between ``resize`` and ``commit_created``).
    CREATING = 5


# Plain ints for the hot paths: comparing numpy arrays against IntEnum members goes
# through the enum's attribute machinery and costs microseconds per comparison.
_ABSENT, _FREE, _LEASED, _DRAINING, _RETIRED, _CREATING = (int(s) for s in ChunkState)


@dataclass(frozen=True)
class ResizePlan:
    """What ``resize`` changed and what the owner must now do."""

    capacity: int
    #: Slots now ``CREATING``: create memory for them, then ``commit_created`` (or ``abort_created``).
    to_create: list[int] = field(default_factory=list)
    #: Slots that went ``FREE`` -> ``RETIRED`` (or were cancelled while ``CREATING``).
    retired: list[int] = field(default_factory=list)
    #: Slots still leased that will retire when given back.
    draining: list[int] = field(default_factory=list)
    #: Slots brought back into service without new memory (draining or retired ones).
    revived: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TableSnapshot:
    """Counts of a lease table at one instant, for the status view and for tests."""

    path: str
    label: str
    chunk_bytes: int
    max_chunks: int
    capacity: int
    generation: int
    states: dict[str, int]
    #: Chunks held per process id.
    holders: dict[int, int]
    waiting: int
    owner_pid: int
    leases_total: int
    waits_total: int
    timeouts_total: int
    reclaimed_total: int

    @property
    def free_chunks(self) -> int:
        return self.states.get("FREE", 0)

    @property
    def free_bytes(self) -> int:
        return self.free_chunks * self.chunk_bytes

    @property
    def pool_bytes(self) -> int:
        """Memory the pool holds: every chunk with physical memory behind it."""
        held = sum(self.states.get(s.name, 0) for s in
                   (ChunkState.FREE, ChunkState.LEASED, ChunkState.DRAINING, ChunkState.RETIRED))
        return held * self.chunk_bytes


# --- the table ----------------------------------------------------------------


class LeaseTable:
    """A lease table mapped from ``path``; create it with :meth:`create`, join with :meth:`open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._shm = SharedFile(self.path, attach=self._attach, detach=self._detach)

    # -- creation and mapping ---------------------------------------------------

    @staticmethod
    def size_bytes(max_chunks: int, queue_slots: int) -> int:
        return _HEADER_BYTES + 8 * (max_chunks * _CHUNK_FIELDS + queue_slots * _QUEUE_FIELDS)

    @classmethod
    def create(cls, path: str | os.PathLike[str], max_chunks: int, chunk_bytes: int, *,
               label: str = "", queue_slots: int = 1024) -> LeaseTable:
        """Write a fresh table (capacity 0) and map it.

        Written to a temporary name and renamed into place (``_shm.write_new``), so a
        process that opens ``path`` sees either the old table or a complete new one.
        """
        if max_chunks < 1 or chunk_bytes < 1 or queue_slots < 1:
            raise ValueError(f"max_chunks {max_chunks}, chunk_bytes {chunk_bytes} and "
                             f"queue_slots {queue_slots} must all be at least 1")

        def fill(mm: mmap.mmap) -> None:  # zero-filled: every slot ABSENT, every queue entry empty
            header = np.ndarray((_HEADER_FIELDS,), np.int64, buffer=mm, offset=0)
            header[_H_MAX] = max_chunks
            header[_H_CHUNK] = chunk_bytes
            header[_H_QUEUE_SLOTS] = queue_slots
            header[_H_LAST_TICKET] = 1  # the first waiter's ticket is the next one
            header[_H_NEXT_LEASE] = 1
            header[_H_OWNER_PID], header[_H_OWNER_START] = this_process()
            mm[_HEADER_FIELDS * 8:_HEADER_BYTES] = label.encode()[:_LABEL_BYTES].ljust(_LABEL_BYTES, b"\0")
            header[_H_VERSION] = _VERSION
            header[_H_MAGIC] = _MAGIC  # last: a table with its magic is complete
            del header

        write_new(Path(path), cls.size_bytes(max_chunks, queue_slots), fill)
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LeaseTable:
        return cls(path)

    def _attach(self, mm: mmap.mmap) -> None:
        header = np.ndarray((_HEADER_FIELDS,), np.int64, buffer=mm, offset=0)
        magic, version = int(header[_H_MAGIC]), int(header[_H_VERSION])
        if magic != _MAGIC or version != _VERSION:
            del header
            raise EbbInternalError(f"{self.path} is not an Ebb lease table of version {_VERSION} "
                                   f"(magic 0x{magic:x}, version {version})")
        self._header = header
        self.max_chunks = n = int(header[_H_MAX])
        self.chunk_bytes = int(header[_H_CHUNK])
        self.queue_slots = q = int(header[_H_QUEUE_SLOTS])
        self.label = bytes(mm[_HEADER_FIELDS * 8:_HEADER_BYTES]).rstrip(b"\0").decode()
        self._state, self._pid_of, self._start_of, self._lease_of, self._gen_of = (
            int64_column(mm, _HEADER_BYTES + 8 * k * n, n) for k in range(_CHUNK_FIELDS))
        qbase = _HEADER_BYTES + 8 * n * _CHUNK_FIELDS
        ticket, pid, start, nchunks = (int64_column(mm, qbase + 8 * k * q, q) for k in range(_QUEUE_FIELDS))
        self._queue = TicketQueue(header, _H_LAST_TICKET, _H_WAITING, ticket=ticket, pid=pid, start=start,
                                  wanted=nchunks)
        self._me = this_process()

    _VIEWS = ("_header", "_state", "_pid_of", "_start_of", "_lease_of", "_gen_of", "_queue")

    def _detach(self) -> None:
        for name in self._VIEWS:
            self.__dict__.pop(name, None)

    @property
    def _fd(self) -> int:
        # The owner compares it with the file at its path before removing that file.
        return self._shm.fd

    def close(self) -> None:
        """Unmap; idempotent. Leases held stay in the table (give them back first)."""
        self._shm.close()

    def __enter__(self) -> LeaseTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads without the lock (single aligned int64 loads) ----------------------

    @property
    def generation(self) -> int:
        return int(self._header[_H_GENERATION])

    @property
    def capacity(self) -> int:
        return int(self._header[_H_CAPACITY])

    def chunk_state(self, index: int) -> ChunkState:
        return ChunkState(int(self._state[index]))

    def chunk_generation(self, index: int) -> int:
        return int(self._gen_of[index])

    def chunk_holder(self, index: int) -> int:
        return int(self._pid_of[index])

    # -- leasing ----------------------------------------------------------------

    def _unavailable(self, nchunks: int, waited_s: float) -> ContextMemoryUnavailable:
        free = int(np.count_nonzero(self._state == _FREE))
        return ContextMemoryUnavailable(nchunks * self.chunk_bytes, free * self.chunk_bytes, waited_s,
                                        self.label or str(self.path))

    def _take(self, nchunks: int, prefer: Sequence[int] = ()) -> list[int] | None:
        free = (self._state == _FREE).nonzero()[0]
        if len(free) < nchunks:
            return None
        if prefer:
            picked = self._pick_preferred(free, nchunks, prefer)
        else:
            picked = free[:nchunks]
        h = self._header
        lease_id = int(h[_H_NEXT_LEASE])
        h[_H_NEXT_LEASE] = lease_id + 1
        h[_H_LEASES] += 1
        self._state[picked] = _LEASED
        self._pid_of[picked] = self._me[0]
        self._start_of[picked] = self._me[1]
        self._lease_of[picked] = lease_id
        return picked.tolist()

    def _pick_preferred(self, free: np.ndarray, nchunks: int, prefer: Sequence[int]) -> np.ndarray:
        """``nchunks`` free chunks, position ``k`` holding ``prefer[k]`` wherever that one is
        free: a replica that still has those chunks mapped at those places skips mapping them."""
        n = self.max_chunks
        wanted = [int(i) for i in prefer[:nchunks]]
        keep = [i if 0 <= i < n and self._state[i] == _FREE else -1 for i in wanted]
        keep += [-1] * (nchunks - len(keep))
        taken = {i for i in keep if i >= 0}
        if len(taken) != sum(i >= 0 for i in keep):  # a repeated index in ``prefer``: ignore it
            return free[:nchunks]
        others = iter(i for i in free.tolist() if i not in taken)
        return np.array([i if i >= 0 else next(others) for i in keep], dtype=np.int64)

    def lease(self, nchunks: int, deadline_s: float, prefer: Sequence[int] = ()) -> list[int]:
        """Take ``nchunks`` chunks for this process, waiting up to ``deadline_s`` seconds.

        Returns their indices (ascending; with ``prefer``, position ``k`` is ``prefer[k]``
        wherever that chunk is free, the others ascending after). ``prefer`` changes
        which free chunks are taken, never whether or when: fairness is unchanged. Raises ``ContextMemoryUnavailable`` with the
        bytes asked for, the bytes free and the time waited when the deadline passes,
        or at once when the request exceeds the pool's capacity (it could only succeed
        after the pool grows, and meanwhile it would block every waiter behind it).
        """
        nchunks = int(nchunks)
        if nchunks < 1:
            raise ValueError(f"a lease needs at least one chunk, got {nchunks}")
        start = time.monotonic()
        self._shm.lock()
        try:
            if int(self._header[_H_CAPACITY]) < nchunks:
                raise self._unavailable(nchunks, 0.0)
            if self._queue.waiting == 0:
                got = self._take(nchunks, prefer)
                if got is not None:
                    return got
            if deadline_s <= 0:
                self._header[_H_TIMEOUTS] += 1
                raise self._unavailable(nchunks, 0.0)
            ticket = self._queue.enqueue(self._me, nchunks)
            if ticket == 0:
                # Every queue entry is taken: the GPU is far more oversubscribed than a
                # deadline could fix; refuse now rather than wait without a place in line.
                self._header[_H_TIMEOUTS] += 1
                raise self._unavailable(nchunks, 0.0)
            self._header[_H_WAITS] += 1
        finally:
            self._shm.unlock()

        def turn(place: int, now: float) -> list[int] | None:
            too_big = int(self._header[_H_CAPACITY]) < nchunks
            if not too_big and place == 0:
                got = self._take(nchunks, prefer)
                if got is not None:
                    return got
            if too_big or now - start >= deadline_s:
                self._header[_H_TIMEOUTS] += 1
                raise self._unavailable(nchunks, now - start)
            return None

        return wait_in_line(self._shm, self._queue, ticket, until_s=start + deadline_s, backoff=_BACKOFF,
                            turn=turn, reap=self._reclaim_dead_locked)

    def give_back(self, indices: Sequence[int]) -> None:
        """Return the chunks of one lease (the list ``lease`` returned). Draining chunks retire now.

        The indices must be exactly one lease's chunks, held by this process: anything
        else is a bug (a double give-back would hand a chunk that is someone else's by
        now to a third holder), so it raises ``EbbInternalError`` and changes nothing.
        """
        indices = [int(i) for i in indices]
        if not indices:
            return
        self._shm.lock()
        try:
            first = indices[0]
            lease_id = int(self._lease_of[first]) if 0 <= first < self.max_chunks else 0
            # Lease ids are unique and only held chunks carry one, so the lease's chunks
            # are exactly the slots with its id: one scan checks membership, completeness
            # and duplicates at once.
            held = (self._lease_of == lease_id).nonzero()[0] if lease_id else np.empty(0, np.int64)
            if (not lease_id or held.tolist() != sorted(indices)
                    or int(self._pid_of[first]) != self._me[0] or int(self._start_of[first]) != self._me[1]):
                raise EbbInternalError(
                    f"process {self._me[0]} gave back chunks {indices} that are not one whole lease of its own "
                    f"(lease {lease_id} holds {held.tolist()}, "
                    f"holder {int(self._pid_of[first]) if 0 <= first < self.max_chunks else None})")
            self._release_rows(held)
        finally:
            self._shm.unlock()

    def _release_rows(self, idx: np.ndarray) -> None:
        draining = self._state[idx] == _DRAINING
        if draining.any():
            self._state[idx] = np.where(draining, _RETIRED, _FREE)
            self._header[_H_GENERATION] += 1
        else:
            self._state[idx] = _FREE
        self._pid_of[idx] = 0
        self._start_of[idx] = 0
        self._lease_of[idx] = 0

    # -- dead holders -------------------------------------------------------------

    def reclaim_dead(self) -> list[int]:
        """Free the chunks of processes that died holding them; drop dead waiters.

        Returns the reclaimed chunk indices. Safe to call from any process at any time:
        the owner calls it periodically and when a client's socket closes, waiters call
        it while they wait.
        """
        with self._shm.locked():
            return self._reclaim_dead_locked()

    def _reclaim_dead_locked(self) -> list[int]:
        state = self._state
        held = np.flatnonzero((state == _LEASED) | (state == _DRAINING))
        holders = list(zip(self._pid_of[held].tolist(), self._start_of[held].tolist(), strict=True))
        dead = dead_among(set(holders) | self._queue.members(), self._me)
        if not dead:
            return []
        reclaimed = held[[p in dead for p in holders]] if len(held) else held
        if len(reclaimed):
            self._release_rows(reclaimed)
            self._header[_H_RECLAIMED] += len(reclaimed)
            logger.warning("reclaimed %d chunk(s) (%.0f MiB) from dead process(es) %s",
                           len(reclaimed), len(reclaimed) * self.chunk_bytes / MiB, sorted(p for p, _ in dead))
        self._queue.drop(dead)
        return reclaimed.tolist()

    # -- size (owner side) ----------------------------------------------------------

    def resize(self, nchunks: int) -> ResizePlan:
        """Set the capacity to ``nchunks`` (clipped to ``0..max_chunks``).

        Shrinking retires free chunks (highest index first), cancels chunks still being
        created, then marks leased chunks draining. Growing revives draining chunks,
        then retired ones (their memory still exists), then marks empty slots
        ``CREATING`` for the owner to back with memory.
        """
        target = max(0, min(int(nchunks), self.max_chunks))
        retired: list[int] = []
        draining: list[int] = []
        revived: list[int] = []
        to_create: list[int] = []
        with self._shm.locked():
            state = self._state
            counted = int(np.count_nonzero((state == _FREE) | (state == _LEASED) | (state == _CREATING)))
            if counted > target:
                excess = counted - target
                for wanted, new, out in ((_FREE, _RETIRED, retired), (_CREATING, _ABSENT, retired),
                                         (_LEASED, _DRAINING, draining)):
                    picked = np.flatnonzero(state == wanted)[::-1][:excess]
                    state[picked] = new
                    out.extend(picked.tolist())
                    excess -= len(picked)
                if retired:
                    self._header[_H_GENERATION] += 1
            elif counted < target:
                need = target - counted
                for wanted, new, out in ((_DRAINING, _LEASED, revived), (_RETIRED, _FREE, revived),
                                         (_ABSENT, _CREATING, to_create)):
                    picked = np.flatnonzero(state == wanted)[:need]
                    state[picked] = new
                    out.extend(picked.tolist())
                    need -= len(picked)
                target -= need  # too few slots: the capacity is what can exist
            self._header[_H_CAPACITY] = target
        return ResizePlan(target, to_create, retired, draining, revived)

    def commit_created(self, indices: Sequence[int]) -> list[int]:
        """Put slots whose memory now exists into service.

        Returns the indices that were *not* committed because a shrink cancelled them
        meanwhile: the owner must release their memory.
        """
        cancelled = []
        with self._shm.locked():
            for i in indices:
                if int(self._state[i]) == _CREATING:
                    self._gen_of[i] += 1
                    self._state[i] = _FREE
                else:
                    cancelled.append(int(i))
            self._header[_H_GENERATION] += 1
        return cancelled

    def abort_created(self, indices: Sequence[int]) -> None:
        """Creating memory failed for these slots: empty them and lower the capacity."""
        with self._shm.locked():
            aborted = [int(i) for i in indices if int(self._state[i]) == _CREATING]
            self._state[aborted] = _ABSENT
            self._header[_H_CAPACITY] -= len(aborted)

    def collect_retired(self) -> list[int]:
        """Empty every retired slot and return them; the owner releases their memory."""
        with self._shm.locked():
            retired = np.flatnonzero(self._state == _RETIRED)
            if len(retired):
                self._state[retired] = _ABSENT
                self._header[_H_GENERATION] += 1
            return retired.tolist()

    def set_owner(self, pid: int) -> None:
        with self._shm.locked():
            self._header[_H_OWNER_PID] = pid
            self._header[_H_OWNER_START] = process_start(pid)

    @property
    def owner_alive(self) -> bool:
        return process_alive(int(self._header[_H_OWNER_PID]), int(self._header[_H_OWNER_START]))

    # -- inspection ---------------------------------------------------------------

    def snapshot(self) -> TableSnapshot:
        with self._shm.locked():
            state = self._state.copy()
            pids = self._pid_of.copy()
            h = self._header.copy()
        counts = np.bincount(state, minlength=len(ChunkState))
        held = (state == _LEASED) | (state == _DRAINING)
        holders = {int(p): int(n) for p, n in zip(*np.unique(pids[held], return_counts=True), strict=True)}
        return TableSnapshot(
            path=str(self.path), label=self.label, chunk_bytes=self.chunk_bytes, max_chunks=self.max_chunks,
            capacity=int(h[_H_CAPACITY]), generation=int(h[_H_GENERATION]),
            states={s.name: int(counts[s]) for s in ChunkState}, holders=holders, waiting=int(h[_H_WAITING]),
            owner_pid=int(h[_H_OWNER_PID]), leases_total=int(h[_H_LEASES]), waits_total=int(h[_H_WAITS]),
            timeouts_total=int(h[_H_TIMEOUTS]), reclaimed_total=int(h[_H_RECLAIMED]))

    def held_by(self, pid: int) -> list[int]:
        """Chunks held by ``pid`` (for tests and diagnostics)."""
        state = self._state
        held = (state == _LEASED) | (state == _DRAINING)
        return np.flatnonzero(held & (self._pid_of == pid)).tolist()
