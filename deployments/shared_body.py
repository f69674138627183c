"""A request body received straight into anonymous shared memory, for a parse worker
process to read in place.

Why: a large JSON body is parsed in a worker process (a JSON parser holds the GIL for
the whole parse). Handed over through ``ProcessPoolExecutor``'s queue, the body was
pickled on the ingress: a bytearray is copied to bytes, then into the pickle's buffer,
all with the GIL held in one C call. A CPU profile of the ingress with two clients
sending 11 MiB JSON bodies found half of its GIL-holding samples there (about 18 ms per
body, in one piece), and every other request of the replica waits for the GIL that
long. Here the body is written into a ``memfd`` as it arrives, and the worker maps the
same pages: no copy and no pickle of the body, and its memory goes back to the OS as
soon as both sides close it.

A memfd, not a file in /dev/shm: containers often give /dev/shm 64 MiB (a file there
past that raises SIGBUS on a write), while a memfd lives on the kernel's own shmem
mount, bounded by memory alone, like the heap; and an unlinked memfd leaves no name
behind if the ingress dies. Its pages are taken as bytes arrive, as a growing
bytearray's are, so a client that declares 64 MiB and sends slowly holds only what it
sent. The worker opens it by ``/proc/<ingress pid>/fd/<fd>`` and checks the memfd's
unique name there, so it can never read another file that reused the descriptor's number.
"""

from __future__ import annotations

import functools
import mmap
import os
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["BodySource", "SharedBody", "map_body", "supported"]

_PREFIX = "ebb-body-"


@functools.cache
def supported() -> bool:
    """memfd_create and /proc (Linux); elsewhere bodies go to the worker by pickle."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@dataclass(frozen=True)
class BodySource:
    """What the worker needs to map a body: where its descriptor is, its name and size."""

    path: str
    name: str
    size: int


class SharedBody:
    """A body of at most ``capacity`` bytes (its declared Content-Length), written as it
    arrives. Owned by the ingress: :meth:`close` closes the descriptor (the pages go
    when no worker maps them either)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a shared body needs a positive capacity, got {capacity}")
        self.name = f"{_PREFIX}{uuid.uuid4().hex}"
        self._fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, capacity)  # sparse: pages come as bytes are written
        except BaseException:
            os.close(self._fd)
            raise
        self.capacity = capacity
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; past the capacity is a ``ValueError`` (HTTP framing stops a
        body at its Content-Length, so this is a guard, not a path)."""
        end = self.size + len(chunk)
        if end > self.capacity:
            raise ValueError(f"body is longer than its declared {self.capacity} bytes")
        # pwrite, not a store into a map: the kernel takes the pages inside the call,
        # with the GIL released; stores fault each new page in with the GIL held (on
        # the CPU machine that put 70% of the ingress's GIL time under large bodies here).
        view = memoryview(chunk)
        while view:
            written = os.pwrite(self._fd, view, self.size)
            self.size += written
            view = view[written:]

    def read_all(self) -> bytes:
        """The body's bytes, copied out (for a worker that cannot map it)."""
        out = bytearray()
        while len(out) < self.size:
            piece = os.pread(self._fd, self.size - len(out), len(out))
            if not piece:
                raise EOFError(f"shared body {self.name}: {len(out)} of {self.size} bytes readable")
            out += piece
        return bytes(out)

    def source(self) -> BodySource:
        return BodySource(f"/proc/{os.getpid()}/fd/{self._fd}", self.name, self.size)

    def close(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1


def map_body(source: BodySource) -> mmap.mmap:
    """The worker's read-only map of a :class:`SharedBody` (close it when done)."""
    if source.size <= 0:
        raise ValueError(f"shared body {source.name}: nothing to map ({source.size} bytes)")
    fd = os.open(source.path, os.O_RDONLY)
    try:
        # The descriptor number could have been closed and reused since it was sent
        # (a request cancelled meanwhile): the memfd's own name says which file it is.
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not target.startswith(f"/memfd:{source.name}"):
            raise FileNotFoundError(f"shared body {source.name} is gone ({source.path} is {target!r} now)")
        return mmap.mmap(fd, source.size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def close_quietly(mapped: Any) -> None:
    """Unmap; a view still held (by an exception's traceback, say) keeps the map until it
    is collected, which is fine: the pages are freed when the last user lets go."""
    try:
        mapped.close()
    except BufferError:
        pass
