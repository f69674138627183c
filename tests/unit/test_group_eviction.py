"""The group's page-out order (LRU-2): a table of use histories and the order they page out in."""

from __future__ import annotations

import pytest

from engine_runtime.group.eviction import UseHistory, eviction_key


def _history(*uses: int) -> UseHistory:
    h = UseHistory()
    for seq in uses:
        h.record_use(seq)
    return h


@pytest.mark.parametrize("uses, expected", [
    # Each used once: least recently used first (LRU among one-off models).
    ({"a": (1,), "b": (2,), "c": (3,)}, ["a", "b", "c"]),
    # Used twice beats used once, however recent the one-off use is.
    ({"hot": (1, 2), "new": (3,)}, ["new", "hot"]),
    # Among models used twice or more: the oldest second-to-last use first.
    ({"x": (1, 9), "y": (5, 6), "z": (3, 4)}, ["x", "z", "y"]),
    # Only the last two uses count: many old uses do not protect a model gone cold.
    ({"old": (1, 2, 3, 4), "warm": (6, 7)}, ["old", "warm"]),
    # Never used (added lazily, no call yet): before any model that was.
    ({"idle": (), "once": (2,)}, ["idle", "once"]),
])
def test_page_out_order(uses, expected):
    histories = {name: _history(*seqs) for name, seqs in uses.items()}
    assert sorted(histories, key=lambda n: eviction_key(histories[n])) == expected


def test_a_calls_end_refreshes_recency_without_counting_a_use():
    h = _history(4)
    h.refresh(7)
    assert (h.previous_seq, h.last_seq) == (0, 7)
    h.record_use(9)
    assert (h.previous_seq, h.last_seq) == (7, 9)
