"""The lease table finds free chunks without scanning them all (issue 14): its free
count and low-water mark stay exact through every operation that changes a chunk's
state, and a lease still takes the lowest free chunks, as it did by scanning."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from engine_runtime.memory.pool import _lease_table as lt
from engine_runtime.memory.pool._lease_table import LeaseTable

MAX_CHUNKS = 600  # more than two scan blocks


def _expected_lease(free: list[int], n: int, prefer) -> list[int]:
    """What a lease of ``n`` takes from the ``free`` chunks (ascending), by the rule both
    its paths follow: position ``k`` is ``prefer[k]`` where that one is free, the rest
    the lowest free ones; a repeated preference is ignored."""
    free_set = set(free)
    keep = [i if i in free_set else -1 for i in prefer[:n]] + [-1] * (n - len(prefer[:n]))
    kept = [i for i in keep if i >= 0]
    if len(set(kept)) != len(kept):
        return free[:n]
    others = iter(i for i in free if i not in set(kept))
    return [i if i >= 0 else next(others) for i in keep]


def _check(t: LeaseTable) -> None:
    free = np.flatnonzero(t._state == lt._FREE)
    assert int(t._header[lt._H_NFREE]) == len(free)
    if len(free):
        assert int(t._header[lt._H_FREE_LOW]) <= int(free[0]), "a free chunk below the low-water mark"


@pytest.mark.parametrize("seed", range(4))
def test_free_count_and_mark_stay_exact_through_random_operations(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    t = LeaseTable.create(tmp_path / "t", max_chunks=MAX_CHUNKS, chunk_bytes=1, label="x")
    try:
        held: list[list[int]] = []
        returned: list[list[int]] = []  # leases given back: what a replica that kept them mapped asks for
        for _ in range(400):
            op = rng.random()
            if op < 0.08:
                plan = t.resize(rng.randint(0, MAX_CHUNKS))
                if plan.to_create:
                    if rng.random() < 0.8:
                        t.commit_created(plan.to_create)
                    else:
                        t.abort_created(plan.to_create)
                if rng.random() < 0.5:
                    t.collect_retired()
            elif op < 0.55:
                n = rng.randint(1, 40)
                free_before = np.flatnonzero(t._state == lt._FREE)
                pick = rng.random()
                if pick < 0.3 and returned:
                    n = len(returned[-1])  # the same call again (the word-by-word fast path when free)
                    prefer = returned.pop()
                elif pick < 0.45:
                    prefer = rng.sample(range(MAX_CHUNKS), rng.randint(0, 3))
                elif pick < 0.5:
                    prefer = [rng.randrange(MAX_CHUNKS)] * 2  # a repeated index: ignored
                else:
                    prefer = ()
                expected = _expected_lease(free_before.tolist(), n, prefer) if len(free_before) >= n else None
                try:
                    got = t.lease(n, deadline_s=0, prefer=prefer)
                except Exception:  # noqa: BLE001 - not enough free: refused, nothing taken
                    assert np.array_equal(np.flatnonzero(t._state == lt._FREE), free_before)
                else:
                    assert got == expected  # whichever path took it (word by word up to 16 chunks)
                    assert len(set(got)) == n and all(t._state[i] == lt._LEASED for i in got)
                    held.append(got)
            elif held:
                lease = held.pop(rng.randrange(len(held)))
                t.give_back(lease)
                returned.append(lease)
            _check(t)
        for lease in held:
            t.give_back(lease)
        _check(t)
    finally:
        t.close()


def test_preferred_chunks_keep_their_places(tmp_path: Path):
    t = LeaseTable.create(tmp_path / "t", max_chunks=MAX_CHUNKS, chunk_bytes=1)
    try:
        t.commit_created(t.resize(MAX_CHUNKS).to_create)
        got = t.lease(4, deadline_s=0, prefer=[500, 7, 300])
        assert got == [500, 7, 300, 0]
        t.give_back(got)
        assert t.lease(2, deadline_s=0) == [0, 1]
        _check(t)
    finally:
        t.close()
