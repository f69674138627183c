"""The serving processes' C heap (glibc malloc): kept for the next request, and handed
back after a large body.

Why tune it: every request allocates and frees buffers of the tensor's size (a ResNet-50
image is 602 KB: gRPC's ``raw_input_contents`` copied out of the message, an HTTP body,
the arrays built from them). glibc serves blocks that large from fresh ``mmap``s, or,
once its dynamic threshold has moved, from the top of the heap, which it trims back to
the OS as soon as 2x that size lies free there. Either way the next request takes the
pages again, one page fault each: on the CPU machine turning one 602 KB gRPC request
into the protocol's request object took 870-920 µs that way, against 48 µs with the heap
kept (docs/benchmarks.md §14), all of it with the GIL held. The process keeps up to
:data:`TRIM_THRESHOLD_BYTES` of free heap instead, and :func:`malloc_trim` after a large
body (deployments.body_intake) still gives the rest back, so the ingress's memory returns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_heap_for_requests", "malloc_trim"]

logger = logging.getLogger(__name__)

#: Blocks below this come from the heap (reused), larger ones from mmap (given back at
#: free): a batch of 8 ResNet images (4.8 MB) stays on the heap, a 24 MiB JSON body does not.
MMAP_THRESHOLD_BYTES = 8 * 2**20
#: Free heap kept at its top before glibc trims it by itself.
TRIM_THRESHOLD_BYTES = 64 * 2**20
# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def malloc_trim() -> None:
    """glibc's ``malloc_trim(0)`` where there is one: freed large bodies otherwise stay in
    the process's heap arenas (issue 14 measured an ingress at 596 MB after four 60 MB bodies)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def keep_heap_for_requests() -> bool:
    """Fix glibc's thresholds for this process (once; True where it took)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not ok:
        logger.warning("mallopt refused Ebb's heap thresholds; requests may page-fault their buffers in")
    return ok
