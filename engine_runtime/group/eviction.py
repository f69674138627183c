"""Which idle models a group pages out first: LRU-2, so frequently used models stay resident.

Plain LRU pages out whichever idle model was used longest ago, so a run of calls to
cold models (each called once in a while) pushes out a model called every few dozen
calls: with Zipf s=1.1 traffic over 200 models and 32 resident (the density
benchmark), a simulation of the group's choices under LRU pages in 0.4% of the three
hottest models' calls and 6% of the ten hottest's, every such call paying a page-out
and a page-in (about 4 ms for ResNet-50 on an H200) in the hot models' p99.

LRU-2 (O'Neil, O'Neil and Weikum, "The LRU-K page replacement algorithm", SIGMOD
1993) ranks a model by its *second* most recent use: the model whose second-to-last
use is oldest goes first. A model used once (since the group was made) has no second
use and goes before any model used twice, least recently used first among them, so a
stream of one-off calls evicts one-off models and leaves the frequently used ones. In
the same simulation it paged in none of the three hottest models' calls and 0.9% of
the ten hottest's, and 16% fewer page-ins in all. It needs no tuning (no window, no
decay constant) and only two numbers per model, kept while the model is paged out,
so a hot model paged out by the coordinator comes back with its history.

Chosen over LFU with decay (a time constant to tune per traffic), ARC and 2Q (lists
of paged-out "ghosts" and an adaptive split: more state for the same effect here).
Its known cost: a model called twice in a burst and then no more looks frequently
used until the other models' second-to-last uses pass its own (LRU-K's "correlated
references", which its authors handle with a correlation period, one more parameter).
A call is the unit of use here, and a replica preloading its models does not count as
one (``EngineGroup.ensure_resident`` moves recency only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UseHistory:
    """A model's last two uses, as the group's monotonic use counter numbered them (0: none)."""

    #: The most recent use (a call's start, refreshed at its end).
    last_seq: int = 0
    #: The use before it; 0 while the model was used at most once.
    previous_seq: int = 0

    def record_use(self, seq: int) -> None:
        """A new use: a call starts (a page-in asked for without a call only refreshes)."""
        self.previous_seq, self.last_seq = self.last_seq, int(seq)

    def refresh(self, seq: int) -> None:
        """The same use again (its call ended): recency moves, the count of uses does not."""
        self.last_seq = int(seq)


def eviction_key(history: UseHistory) -> tuple[int, int]:
    """Sort key of the page-out order: smallest first. By second-to-last use (models used
    once first), then by last use."""
    return (history.previous_seq, history.last_seq)
