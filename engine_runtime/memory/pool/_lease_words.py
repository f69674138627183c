"""The lease table's file as one flat array of int64 words, and the per-call fast path over it.

A replica that kept its chunks mapped asks for the same ones again on every call; a
numpy call costs about a microsecond, a word about 30 ns, so a small lease is taken and
given back word by word here, the table's lock held by the caller (``LeaseTable``),
with the same checks and the same changes to the table's figures as its vectorised path.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine_runtime.errors import EbbInternalError
from engine_runtime.memory._shm import Proc
from engine_runtime.memory.pool._table_layout import (
    _CHUNK_FIELDS, _DRAINING, _FREE, _H_FREE_LOW, _H_GENERATION, _H_LEASES, _H_NEXT_LEASE, _H_NFREE, _HEADER_BYTES,
    _LEASED, _RETIRED,
)

#: Leases of up to this many chunks are taken (when preferred) and given back word by
#: word; larger ones with numpy. Per chunk a word-by-word lease and give-back cost about
#: 0.6 µs, numpy about 9 µs a lease whatever its size (CPU, scripts/bench_pool.py
#: --cpu-path): they cross near 16 chunks, 1 GiB of the default 64 MiB chunks.
WORDWISE_MAX = 16


class ChunkWords:
    """Word ``_H_*`` of ``w`` is a header field, word ``at_state + i`` chunk ``i``'s state,
    and so on for each per-chunk column (``_table_layout``)."""

    __slots__ = ("w", "n", "at_state", "at_pid", "at_start", "at_lease", "at_gen", "at_count")

    def __init__(self, mm: mmap.mmap, max_chunks: int) -> None:
        self.w = memoryview(mm).cast("q")
        self.n = max_chunks
        self.at_state, self.at_pid, self.at_start, self.at_lease, self.at_gen, self.at_count = (
            (_HEADER_BYTES + 8 * k * max_chunks) // 8 for k in range(_CHUNK_FIELDS))

    def release(self) -> None:
        """Let the mapping close (a memoryview still exported would keep it open)."""
        self.w.release()

    def take_preferred(self, nchunks: int, prefer: Sequence[int], me: Proc,
                       lowest_free: Callable[[int], np.ndarray], where: str | Path) -> list[int] | None:
        """A small lease with a preference, word by word (the lock held, at least
        ``nchunks`` chunks free): position ``k`` is ``prefer[k]`` wherever that chunk is
        free, the others are the lowest free chunks, as ``_pick_preferred`` gives. A
        replica whose chunks nobody took since its last call reads and writes a few words:
        no numpy, no sets. None, with nothing changed, on a repeated index (the vectorised
        path then ignores the preference). ``me`` holds the lease; ``lowest_free`` is the
        table's scan for the lowest free chunks; ``where`` names the table in errors."""
        w, at, n = self.w, self.at_state, self.n
        picked = [-1] * nchunks
        kept: list[int] = []
        for k in range(min(nchunks, len(prefer))):
            i = int(prefer[k])
            if not 0 <= i < n:
                continue
            state = w[at + i]
            if state == _FREE:
                w[at + i] = _LEASED
                picked[k] = i
                kept.append(i)
            elif state == _LEASED and i in kept:  # marked a moment ago: a repeated index
                for j in kept:
                    w[at + j] = _FREE
                return None
        if len(kept) < nchunks:
            # The kept chunks are marked already, so the scan passes over them.
            others = lowest_free(nchunks - len(kept)).tolist()
            if len(others) < nchunks - len(kept):
                for j in kept:
                    w[at + j] = _FREE
                w[_H_FREE_LOW] = min([w[_H_FREE_LOW], *kept])  # the scan may have passed them
                raise EbbInternalError(f"lease table {where}: {w[_H_NFREE]} chunks counted free, "
                                       f"{len(kept) + len(others)} found")
            fill = iter(others)
            for k in range(nchunks):
                if picked[k] < 0:
                    picked[k] = i = next(fill)
                    w[at + i] = _LEASED
        w[_H_NFREE] -= nchunks  # as _mark_taken; the low-water mark stays a lower bound
        lease_id = w[_H_NEXT_LEASE]
        w[_H_NEXT_LEASE] = lease_id + 1
        w[_H_LEASES] += 1
        pid, start = me
        at_pid, at_start, at_lease, at_count = self.at_pid, self.at_start, self.at_lease, self.at_count
        for i in picked:
            w[at_pid + i] = pid
            w[at_start + i] = start
            w[at_lease + i] = lease_id
            w[at_count + i] = nchunks
        return picked


    def give_back(self, indices: list[int], me: Proc) -> None:
        """``LeaseTable.give_back`` of a small lease by ``me`` (the lock held): the same
        checks and the same changes as the vectorised path (``_release_rows``), word by word."""
        w, n, count = self.w, self.n, len(indices)
        at_state, at_pid, at_start, at_lease, at_count = (
            self.at_state, self.at_pid, self.at_start, self.at_lease, self.at_count)
        first = indices[0]
        lease_id = w[at_lease + first] if 0 <= first < n else 0
        pid, start = me
        # As the vectorised check: distinct indices that all carry the lease's id, as many
        # as the lease has, held by this process, are exactly the lease.
        whole = (lease_id and w[at_count + first] == count and w[at_pid + first] == pid
                 and w[at_start + first] == start and len(set(indices)) == count)
        if whole:
            for i in indices:
                if not (0 <= i < n and w[at_lease + i] == lease_id):
                    whole = False
                    break
        if not whole:
            in_range = 0 <= first < n
            raise EbbInternalError(
                f"process {pid} gave back chunks {indices[:16]} that are not one whole lease of its own "
                f"(lease {lease_id} has {w[at_count + first] if in_range else 0} chunks, "
                f"holder {w[at_pid + first] if in_range else None})")
        low, freed, retired = w[_H_FREE_LOW], 0, False
        for i in indices:
            if w[at_state + i] == _DRAINING:
                w[at_state + i] = _RETIRED
                retired = True
            else:
                w[at_state + i] = _FREE
                freed += 1
                if i < low:
                    low = i
            w[at_pid + i] = 0
            w[at_start + i] = 0
            w[at_lease + i] = 0
            w[at_count + i] = 0
        if retired:
            w[_H_GENERATION] += 1
        w[_H_NFREE] += freed  # as _mark_free
        w[_H_FREE_LOW] = low
