"""How the ingress takes a request's body without its event loop ever waiting on one.

A body is received under a deadline (408) and a size limit (413); only
``http.max_concurrent_body_reads`` bodies that need more than their first piece are
received at once (more get 503), so stalled uploads cannot take every request slot.
Large bodies are parsed, and large answers encoded, off the loop: on worker threads, and
large JSON in worker processes, since a JSON parser holds the GIL for its whole parse.
Binary tensors are views of the body and are parsed on the loop up to their own limit.
After a large body the heap is trimmed, so the ingress's memory returns.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from starlette.requests import ClientDisconnect, Request

from deployments import heap, parse_worker, protocol, shared_body
from deployments.config import HttpConfig
from deployments.shared_body import SharedBody

logger = logging.getLogger(__name__)

#: A heap trim (heap.malloc_trim) this long after a large body, at most one pending.
TRIM_DELAY_S = 0.5
PARSE_THREADS = 4


def is_cancelled(exc: BaseException) -> bool:
    """Serve cancels a request whose client went away; its body's ``receive`` (or a call
    the ingress made for it) then raises Ray's ``TaskCancelledError``."""
    import ray.exceptions as rex

    return isinstance(exc, (ClientDisconnect, rex.TaskCancelledError))


class BodyIntake:
    """One ingress replica's body reading, parsing off the loop and heap trimming."""

    def __init__(self, http: HttpConfig) -> None:
        self.http = http
        self._bodies_receiving = 0
        self._parser = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="ebb-parse")
        self._trim_pending = False
        self._processes: ProcessPoolExecutor | None = None
        #: Whether the workers can map shared bodies: None until the first one is tried.
        self._shared_ok: bool | None = None

    async def off_loop(self, nbytes: int, fn, *args, binary: bool = False, **kwargs) -> Any:
        """``fn(*args, **kwargs)``; on a worker thread when ``nbytes`` is large enough to matter:
        ``http.parse_in_thread_bytes``, or for ``binary`` tensors (views of the body, whose
        parse does not grow with their size) ``http.parse_binary_in_thread_bytes``."""
        limit = self.http.parse_binary_in_thread_bytes if binary else self.http.parse_in_thread_bytes
        if nbytes < limit:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._parser, functools.partial(fn, *args, **kwargs))

    def in_process(self, nbytes: int) -> bool:
        return self.http.parse_processes > 0 and nbytes >= self.http.parse_in_process_bytes

    async def parse(self, parse, body: bytearray | SharedBody, *, binary: bool) -> protocol.InferRequest:
        """``parse(body)`` where it costs the event loop least: a large JSON body in a
        worker process (JSON parsers, json and orjson, hold the GIL for the whole parse,
        so on a thread a 24 MiB body still stops the loop for its full parse); others
        through :meth:`off_loop`. A body in shared memory is the worker's to read in
        place, and is closed here once no worker can still be reading it."""
        if isinstance(body, SharedBody):
            try:
                shared_ok = await self._shared_works()
                if not shared_ok:
                    data = body.read_all()
            except BaseException:
                body.close()
                raise
            if shared_ok:
                return await self._in_worker(parse_worker.parse_shared_and_trim, parse, body.source(), shared=body)
            body.close()
            return await self._in_worker(parse_worker.parse_and_trim, parse, data)
        if not binary and self.in_process(len(body)):
            # Not in shared memory (no Content-Length, say): the body goes to the worker
            # pickled, a copy each way.
            return await self._in_worker(parse_worker.parse_and_trim, parse, body)
        return await self.off_loop(len(body), parse, body, binary=binary)

    async def _shared_works(self) -> bool:
        """Whether a worker can map the ingress's shared bodies, tried once with a body of
        two bytes; where it cannot, large bodies go by pickle from then on."""
        if self._shared_ok is None:
            try:
                probe = SharedBody(2)
            except OSError as err:  # out of descriptors: try again with the next body
                logger.warning("no shared body for the probe (%s); this body goes by pickle", err)
                return False
            try:
                probe.write(b"{}")
                why_not = await self._in_worker(parse_worker.can_map, probe.source())
            finally:
                probe.close()
            if why_not is not None:
                logger.warning("the JSON parse workers cannot map shared bodies (%s); large bodies go to them by "
                               "pickle, with the GIL held while it is written", why_not)
            self._shared_ok = why_not is None
        return self._shared_ok

    async def _in_worker(self, fn, *args, shared: SharedBody | None = None) -> Any:
        future = None
        try:
            if self._processes is None:
                # spawn, not fork: this is a Ray worker with threads of its own.
                self._processes = ProcessPoolExecutor(max_workers=self.http.parse_processes,
                                                      mp_context=multiprocessing.get_context("spawn"))
            future = self._processes.submit(fn, *args)
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as err:
            # A worker died (killed for memory, say): every later submit would fail the
            # same way, so the pool is replaced on the next body; this one is retryable.
            broken, self._processes = self._processes, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            raise protocol.ProtocolError(
                503, f"the JSON parse worker process of this ingress replica died ({err}); retry",
                headers={"Retry-After": str(self.http.retry_after_s)}) from None
        finally:
            if shared is not None:
                # A cancelled request (its client went away) can leave a worker mapping the
                # body right now: then it is closed when that worker is done.
                if future is None or future.done() or future.cancel():
                    shared.close()
                else:
                    future.add_done_callback(lambda _: shared.close())

    def trim_after(self, nbytes: int) -> None:
        """After a large body: trim the heap once the request is gone (its body, Serve's
        copies of its pieces and the response are freed after this handler returns)."""
        if nbytes < parse_worker.TRIM_AFTER_BYTES or self._trim_pending:
            return
        self._trim_pending = True
        loop = asyncio.get_running_loop()

        def trim() -> None:
            self._trim_pending = False
            loop.run_in_executor(self._parser, heap.malloc_trim)

        loop.call_later(TRIM_DELAY_S, trim)

    async def read(self, request: Request, *, json: bool = False) -> bytearray | SharedBody:
        """The body, into one growing ``bytearray`` (binary tensors become views of it), or,
        for a ``json`` body whose Content-Length sends it to a worker process (see
        :meth:`parse`), into shared memory the worker reads in place (the caller hands it
        to :meth:`parse`, which closes it, or closes it itself).

        Refused by its declared length before a byte is read (413), cut at the limit
        whatever Content-Length claimed (413), and within ``http.body_timeout_s`` of the
        headers (408). A body whose first piece is not all of it takes one of
        ``http.max_concurrent_body_reads`` slots, or gets 503 when none is left.
        """
        limit = self.http.max_body_bytes
        declared = protocol.check_content_length(request.headers.get("content-length"), max_body_bytes=limit)
        body: bytearray | SharedBody = bytearray()
        shareable = self._shared_ok is not False and shared_body.supported()
        if json and declared and self.in_process(declared) and shareable:
            try:
                body = SharedBody(declared)
            except OSError as err:  # out of descriptors or maps: the pickle path, slower but whole
                logger.warning("a %d-byte body could not go to shared memory (%s); it goes to the parse "
                               "worker by pickle", declared, err)
        append = body.write if isinstance(body, SharedBody) else body.extend
        holds_slot = False
        try:
            async with asyncio.timeout(self.http.body_timeout_s):
                while True:
                    try:
                        message = await request.receive()
                    except Exception as err:
                        if is_cancelled(err):
                            raise protocol.ClientDisconnected(len(body)) from None
                        raise
                    if message["type"] == "http.disconnect":
                        raise protocol.ClientDisconnected(len(body))
                    try:
                        append(message.get("body", b""))
                    except ValueError as err:  # past its Content-Length: HTTP framing should not allow it
                        raise protocol.ProtocolError(400, str(err)) from None
                    if len(body) > limit:
                        raise protocol.ProtocolError(413, f"request body is over the limit of {limit} bytes")
                    if not message.get("more_body", False):
                        return body
                    if not holds_slot:
                        if self._bodies_receiving >= self.http.max_concurrent_body_reads:
                            raise protocol.ProtocolError(
                                503, f"{self._bodies_receiving} request bodies are being received already, the "
                                     f"most this ingress replica takes at once "
                                     f"(http.max_concurrent_body_reads); retry",
                                headers={"Retry-After": str(self.http.retry_after_s)})
                        self._bodies_receiving += 1
                        holds_slot = True
        except BaseException as err:
            if isinstance(body, SharedBody):
                body.close()
            if not isinstance(err, TimeoutError):
                raise
            expected = f"of {declared} " if declared is not None else ""
            raise protocol.ProtocolError(
                408, f"request body not received within {self.http.body_timeout_s:g} s "
                     f"({len(body)} bytes {expected}arrived)", headers={"Connection": "close"}) from None
        finally:
            if holds_slot:
                self._bodies_receiving -= 1

    def close(self) -> None:
        """Stop the worker pools. The process pool's queues hold named POSIX semaphores
        (/dev/shm/sem.mp-*, five per pool), unlinked only when those objects are
        collected: the pool is shut down, dropped and collected here, while the process
        lives (a killed one left all five behind)."""
        processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown(wait=True, cancel_futures=True)
            del processes
            gc.collect()
        self._parser.shutdown(wait=False, cancel_futures=True)
