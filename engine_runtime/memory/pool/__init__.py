"""One pool of context memory per GPU, lent per call to whichever replica process runs.

``owner`` (the daemon that creates chunks and resizes), ``client`` (a replica's
``PoolPhysical``, a ``PhysicalSource`` for the arena), ``launcher`` (start the owner or
join it), ``support`` (can this host pool at all), ``_wire`` (files and socket
messages), ``_lease_table`` (the shared-memory table of who holds which chunk, on
:mod:`engine_runtime.memory._shm`; its layout and states in ``_table_layout``).
"""

from engine_runtime.errors import PoolUnavailableError
from engine_runtime.memory.pool._wire import DEFAULT_CHUNK_BYTES, PoolPaths, default_directory
from engine_runtime.memory.pool.client import PoolPhysical
from engine_runtime.memory.pool.launcher import connect_or_start, start_owner
from engine_runtime.memory.pool.owner import ContextPool
from engine_runtime.memory.pool.support import PoolSupport, pool_available

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ContextPool",
    "PoolPaths",
    "PoolPhysical",
    "PoolSupport",
    "PoolUnavailableError",
    "connect_or_start",
    "default_directory",
    "pool_available",
    "start_owner",
]
