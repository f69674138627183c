"""The lease table's layout in shared memory, its chunk states, and the plain data it returns.

The file is an int64 header at fixed positions and a label, then one contiguous int64
column per chunk field, then the waiting queue's columns (``_shm.TicketQueue``).
:mod:`engine_runtime.memory.pool._lease_table` maps it and holds the operations on it;
here are only the positions, sizes and states every operation agrees on, and the
frozen results (``ResizePlan``, ``TableSnapshot``) it hands to the owner and status view.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

_MAGIC = 0x45424250_4F4F4C31  # "EBBPOOL1"
_VERSION = 2

# Header: int64 fields at fixed positions.
_H_MAGIC, _H_VERSION, _H_MAX, _H_CHUNK, _H_CAPACITY, _H_GENERATION = 0, 1, 2, 3, 4, 5
_H_LAST_TICKET, _H_NEXT_LEASE, _H_OWNER_PID, _H_QUEUE_SLOTS = 6, 7, 8, 9
_H_LEASES, _H_WAITS, _H_TIMEOUTS, _H_RECLAIMED, _H_OWNER_START, _H_WAITING = 10, 11, 12, 13, 14, 15
#: Free chunks now; every chunk below ``_H_FREE_LOW`` is not free.
_H_NFREE, _H_FREE_LOW = 16, 17
_HEADER_FIELDS = 18
_LABEL_BYTES = 128
_HEADER_BYTES = _HEADER_FIELDS * 8 + _LABEL_BYTES

# Chunk slots: state, pid, start, lease id, generation, chunks in the lease; one
# contiguous int64 array per field, because contiguous scans are the fast ones.
_CHUNK_FIELDS = 6
# Waiting-queue columns: ticket (0 = empty entry), pid, start, chunks wanted (``_shm.TicketQueue``).
_QUEUE_FIELDS = 4


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
