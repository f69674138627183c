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
* **Finding free chunks** does not scan the table: the header keeps the number of free
  chunks and a low-water mark below which no chunk is free, and a lease takes the
  lowest free chunks scanning from that mark, a block at a time (an H200 at 64 MiB
  has about 2,200 chunks). Each held chunk records how many chunks its lease has, so
  a give-back checks the lease's own chunks only. Every change to or from FREE goes
  through ``_mark_free`` / ``_mark_taken``, which keep both figures exact.
* **The per-call fast path** (``_lease_words``). A replica that kept its chunks mapped
  asks for the same ones again (``prefer``). A lease of up to ``WORDWISE_MAX`` chunks
  with a preference is taken, and such a lease given back, word by word through one
  flat view of the file, scanning for the lowest free chunks only for positions whose
  preferred chunk was taken. Larger leases, and leases without a preference, take the
  vectorised path. Both paths take the same lock, wait in the same queue (no lease
  jumps a waiter) and keep the same figures; the fast one only skips work.

The file's layout, the chunk states and the frozen results are in ``_table_layout``.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Sequence
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
from engine_runtime.memory.pool._lease_words import WORDWISE_MAX, ChunkWords
from engine_runtime.memory.pool._table_layout import (  # the layout the operations below share
    _ABSENT, _CHUNK_FIELDS, _CREATING, _DRAINING, _FREE, _H_CAPACITY, _H_CHUNK, _H_FREE_LOW, _H_GENERATION,
    _H_LAST_TICKET, _H_LEASES, _H_MAGIC, _H_MAX, _H_NEXT_LEASE, _H_NFREE, _H_OWNER_PID, _H_OWNER_START,
    _H_QUEUE_SLOTS, _H_RECLAIMED, _H_TIMEOUTS, _H_VERSION, _H_WAITING, _H_WAITS, _HEADER_BYTES, _HEADER_FIELDS,
    _LABEL_BYTES, _LEASED, _MAGIC, _QUEUE_FIELDS, _RETIRED, _VERSION, ChunkState, ResizePlan, TableSnapshot,
)
from engine_runtime.units import MiB

__all__ = ["ChunkState", "LeaseTable", "ResizePlan", "TableSnapshot", "process_alive", "process_start"]

logger = logging.getLogger(__name__)


#: Chunks looked at per step when looking for the lowest free ones.
_SCAN_BLOCK = 256
#: Waiting: 0.1 ms doubling to 2 ms; dead holders and waiters looked for every 50 ms.
_BACKOFF = Backoff(first_s=0.0001, max_s=0.002, reap_every_s=0.05)


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
        self._state, self._pid_of, self._start_of, self._lease_of, self._gen_of, self._count_of = (
            int64_column(mm, _HEADER_BYTES + 8 * k * n, n) for k in range(_CHUNK_FIELDS))
        qbase = _HEADER_BYTES + 8 * n * _CHUNK_FIELDS
        ticket, pid, start, nchunks = (int64_column(mm, qbase + 8 * k * q, q) for k in range(_QUEUE_FIELDS))
        self._queue = TicketQueue(header, _H_LAST_TICKET, _H_WAITING, ticket=ticket, pid=pid, start=start,
                                  wanted=nchunks)
        # The same file as one flat array of int64 words: header fields read without numpy,
        # and the per-call fast path (``_lease_words``).
        self._words = ChunkWords(mm, n)
        self._me = this_process()

    _VIEWS = ("_header", "_state", "_pid_of", "_start_of", "_lease_of", "_gen_of", "_count_of", "_queue")

    def _detach(self) -> None:
        for name in self._VIEWS:
            self.__dict__.pop(name, None)
        words = self.__dict__.pop("_words", None)
        if words is not None:
            words.release()  # or the mapping cannot close (it would still be exported)

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
        return self._words.w[_H_GENERATION]

    @property
    def capacity(self) -> int:
        return self._words.w[_H_CAPACITY]

    def chunk_state(self, index: int) -> ChunkState:
        return ChunkState(int(self._state[index]))

    def chunk_generation(self, index: int) -> int:
        if not 0 <= index < self.max_chunks:
            raise IndexError(f"chunk {index} outside 0..{self.max_chunks - 1}")
        return self._words.w[self._words.at_gen + index]

    def chunk_holder(self, index: int) -> int:
        return int(self._pid_of[index])

    # -- leasing ----------------------------------------------------------------

    def _unavailable(self, nchunks: int, waited_s: float) -> ContextMemoryUnavailable:
        free = int(self._header[_H_NFREE])
        return ContextMemoryUnavailable(nchunks * self.chunk_bytes, free * self.chunk_bytes, waited_s,
                                        self.label or str(self.path))

    # Every state change to or from FREE goes through these two (the lock is held).

    def _mark_free(self, idx: np.ndarray) -> None:
        """Chunks ``idx`` (distinct, ascending) become free."""
        if len(idx):
            self._state[idx] = _FREE
            h = self._header
            h[_H_NFREE] += len(idx)
            if int(idx[0]) < int(h[_H_FREE_LOW]):
                h[_H_FREE_LOW] = int(idx[0])

    def _mark_taken(self, idx: np.ndarray, state: int) -> None:
        """Free chunks ``idx`` (distinct) go to ``state``."""
        if len(idx):
            self._state[idx] = state
            self._header[_H_NFREE] -= len(idx)

    def _lowest_free(self, count: int) -> np.ndarray:
        """The ``count`` lowest free chunks (fewer if there are not), scanning from the low-water mark."""
        state, h = self._state, self._header
        start = int(h[_H_FREE_LOW])
        found: list[np.ndarray] = []
        have = 0
        while have < count and start < self.max_chunks:
            block = (state[start:start + _SCAN_BLOCK] == _FREE).nonzero()[0]
            if len(block):
                found.append(block + start)
                have += len(block)
            elif have == 0:
                h[_H_FREE_LOW] = start + _SCAN_BLOCK  # nothing free below here: move the mark up
            start += _SCAN_BLOCK
        if len(found) == 1:
            return found[0][:count]
        return np.concatenate(found)[:count] if found else np.empty(0, np.int64)

    def _take(self, nchunks: int, prefer: Sequence[int] = ()) -> list[int] | None:
        if self._words.w[_H_NFREE] < nchunks:
            return None
        if nchunks <= WORDWISE_MAX and len(prefer):
            got = self._words.take_preferred(nchunks, prefer, self._me, self._lowest_free, self.path)
            if got is not None:
                return got
        picked = self._pick_preferred(nchunks, prefer) if prefer else self._lowest_free(nchunks)
        if len(picked) < nchunks:
            raise EbbInternalError(f"lease table {self.path}: {int(self._header[_H_NFREE])} chunks counted free, "
                                   f"{len(picked)} found")
        h = self._header
        lease_id = int(h[_H_NEXT_LEASE])
        h[_H_NEXT_LEASE] = lease_id + 1
        h[_H_LEASES] += 1
        self._mark_taken(picked, _LEASED)
        if not prefer and int(h[_H_FREE_LOW]) <= int(picked[-1]):
            h[_H_FREE_LOW] = int(picked[-1]) + 1  # the lowest free ones are taken: none is left below
        self._pid_of[picked] = self._me[0]
        self._start_of[picked] = self._me[1]
        self._lease_of[picked] = lease_id
        self._count_of[picked] = nchunks
        return picked.tolist()

    def _pick_preferred(self, nchunks: int, prefer: Sequence[int]) -> np.ndarray:
        """``nchunks`` free chunks, position ``k`` holding ``prefer[k]`` wherever that one is
        free: a replica that still has those chunks mapped at those places skips mapping them."""
        n = self.max_chunks
        wanted = [int(i) for i in prefer[:nchunks]]
        keep = [i if 0 <= i < n and self._state[i] == _FREE else -1 for i in wanted]
        keep += [-1] * (nchunks - len(keep))
        kept = [i for i in keep if i >= 0]
        if len(set(kept)) != len(kept):  # a repeated index in ``prefer``: ignore it
            return self._lowest_free(nchunks)
        # The lowest free chunks, as many as are needed besides those kept.
        kept_set = set(kept)
        others = iter(i for i in self._lowest_free(nchunks).tolist() if i not in kept_set)
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
            w = self._words.w
            if w[_H_CAPACITY] < nchunks:
                raise self._unavailable(nchunks, 0.0)
            if w[_H_WAITING] == 0:
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
            if len(indices) <= WORDWISE_MAX:
                self._words.give_back(indices, self._me)
                return
            first = indices[0]
            held = np.array(sorted(indices), dtype=np.int64)
            in_range = 0 <= int(held[0]) and int(held[-1]) < self.max_chunks
            lease_id = int(self._lease_of[first]) if in_range else 0
            # Lease ids are unique and only held chunks carry one, and each holds its
            # lease's size: distinct indices that all carry the id, as many as the lease
            # has, are exactly the lease (no scan of the table).
            if (not lease_id or len(set(indices)) != len(indices)
                    or not bool((self._lease_of[held] == lease_id).all())
                    or int(self._count_of[first]) != len(indices)
                    or int(self._pid_of[first]) != self._me[0] or int(self._start_of[first]) != self._me[1]):
                raise EbbInternalError(
                    f"process {self._me[0]} gave back chunks {indices[:16]} that are not one whole lease of its own "
                    f"(lease {lease_id} has {int(self._count_of[first]) if in_range else 0} chunks, "
                    f"holder {int(self._pid_of[first]) if in_range else None})")
            self._release_rows(held)
        finally:
            self._shm.unlock()

    def _release_rows(self, idx: np.ndarray) -> None:
        """Held chunks ``idx`` (ascending) are given back: free, or retired if draining."""
        draining = self._state[idx] == _DRAINING
        if draining.any():
            self._state[idx[draining]] = _RETIRED
            self._header[_H_GENERATION] += 1
            idx = idx[~draining]
        self._mark_free(idx)
        self._pid_of[idx] = 0
        self._start_of[idx] = 0
        self._lease_of[idx] = 0
        self._count_of[idx] = 0

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
                    if wanted == _FREE:
                        self._mark_taken(picked, new)
                    else:
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
                    if new == _FREE:
                        self._mark_free(picked)
                    else:
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
            created = []
            for i in indices:
                if int(self._state[i]) == _CREATING:
                    self._gen_of[i] += 1
                    created.append(int(i))
                else:
                    cancelled.append(int(i))
            self._mark_free(np.array(sorted(created), dtype=np.int64))
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
