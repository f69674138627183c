"""Dynamic batching as Triton's scheduler does it: a batch forms when the engine is free.

Why not Serve's ``@serve.batch``: its queue forms the next batch while the current one
still runs (the batch closes ``batch_wait_timeout_s`` after its first request) and the
batch then waits for the running one. Under steady load that gives small batches that
queue: on the CPU machine, gRPC at concurrency 4 ran batches of one request that had each
waited 29 ms (``bench_serving.py --quick --embed --direct-ingress``, 2026-12-08), while
four requests were in the queue at once. Here one worker runs one batch at a time and
takes the next one only when that batch is done, so whatever arrived meanwhile joins it;
``max_queue_delay_s`` (Triton's ``max_queue_delay_microseconds``) is counted from the
oldest request's arrival, so a request that waited behind a running batch is not made to
wait again for more company.

Also per object, not per class: a process may hold several replicas' objects (an ingress
with an embedded model beside tests' stand-ins), each with its own queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    item: T
    key: Hashable
    arrived: float
    future: asyncio.Future = field(repr=False)


class DynamicBatcher(Generic[T, R]):
    """``await batcher(item)`` queues ``item``; ``run(list of items)`` answers a batch with
    one result per item, in order. ``key(item)``: items of one batch share it (a group's
    model); the oldest item's key chooses the next batch. A result that is an exception
    instance is returned as it is (the caller decides); ``run`` raising fails its batch."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], *, max_batch_size: int,
                 max_queue_delay_s: float, key: Callable[[T], Hashable] | None = None, name: str = "batcher") -> None:
        self._run = run
        self._key = key
        self.name = name
        self.max_batch_size = 1
        self.max_queue_delay_s = 0.0
        self.set_max_batch_size(max_batch_size)
        self.set_batch_wait_timeout_s(max_queue_delay_s)
        self._pending: collections.deque[_Pending[T]] = collections.deque()
        self._arrival: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # Serve's setter names: what ``reconfigure`` called on ``@serve.batch`` before.
    def set_max_batch_size(self, max_batch_size: int) -> None:
        if int(max_batch_size) < 1:
            raise ValueError(f"{self.name}: max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)

    def set_batch_wait_timeout_s(self, timeout_s: float) -> None:
        if not float(timeout_s) >= 0:
            raise ValueError(f"{self.name}: batch_wait_timeout_s must be >= 0, got {timeout_s}")
        self.max_queue_delay_s = float(timeout_s)

    async def __call__(self, item: T) -> R:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed (the replica is shutting down)")
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        future = loop.create_future()
        self._pending.append(_Pending(item, self._key(item) if self._key else None, loop.time(), future))
        self._arrival.set()
        return await future

    def queued(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Stop the worker; requests still queued fail (the replica is going away). Safe
        from any thread: the worker's loop does the stopping."""
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            self._pending.clear()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop()
        else:
            loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._fail_pending(RuntimeError(f"{self.name} closed with the request still queued"))

    # -- the worker ------------------------------------------------------------------

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        if self._loop is not None and self._loop is not loop:
            # Requests of another (finished) loop cannot be answered on this one.
            self._fail_pending(RuntimeError(f"{self.name}: its event loop changed"))
        self._loop = loop
        self._arrival = asyncio.Event()
        self._task = loop.create_task(self._work(), name=f"{self.name}-worker")

    async def _work(self) -> None:
        while True:
            while not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
            first = self._pending[0]
            if first.future.done():  # its caller went away while it waited
                self._pending.popleft()
                continue
            await self._fill(first)
            batch = self._take(first.key)
            if batch:
                await self._answer(batch)

    async def _fill(self, first: _Pending[T]) -> None:
        """Wait for company until the batch is full or the oldest request's delay is over."""
        loop = asyncio.get_running_loop()
        deadline = first.arrived + self.max_queue_delay_s
        while self._count(first.key) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                return

    def _count(self, key: Hashable) -> int:
        if self._key is None:
            return len(self._pending)
        return sum(1 for p in self._pending if p.key == key)

    def _take(self, key: Hashable) -> list[_Pending[T]]:
        batch, rest = [], collections.deque()
        while self._pending:
            p = self._pending.popleft()
            if p.future.done():
                continue
            if len(batch) < self.max_batch_size and (self._key is None or p.key == key):
                batch.append(p)
            else:
                rest.append(p)
                if self._key is None:
                    break
        rest.extend(self._pending)
        self._pending = rest
        return batch

    async def _answer(self, batch: list[_Pending[T]]) -> None:
        try:
            results = await self._run([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: the batch handler gave {len(results)} results for "
                                   f"{len(batch)} requests")
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RuntimeError(f"{self.name} stopped during the batch"))
            raise
        except Exception as err:  # noqa: BLE001 - the batch's failure is each of its requests'
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        for p, result in zip(batch, results):
            if not p.future.done():
                p.future.set_result(result)

    def _fail_pending(self, err: BaseException) -> None:
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done() and not p.future.get_loop().is_closed():
                p.future.set_exception(err)

