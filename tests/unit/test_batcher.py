"""``deployments.batcher.DynamicBatcher``: the next batch forms when the engine is free."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.batcher import DynamicBatcher


class Handler:
    """Records each batch and when it started; takes ``run_s`` per batch."""

    def __init__(self, run_s: float = 0.0, fail_on: object = None, results_short: bool = False) -> None:
        self.run_s = run_s
        self.fail_on = fail_on
        self.results_short = results_short
        self.batches: list[list] = []
        self.started: list[float] = []
        self.ended: list[float] = []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.append(time.monotonic())
        await asyncio.sleep(self.run_s)
        self.ended.append(time.monotonic())
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"batch with {self.fail_on!r}")
        out = [("done", i) for i in items]
        return out[:-1] if self.results_short else out


def run(coro):
    return asyncio.run(coro)


def test_requests_arriving_while_a_batch_runs_form_the_next_batch_together():
    """Serve's queue closed a batch 5 ms after its first request even while the engine was
    busy, giving batches of one that then waited; here they wait together."""
    handler = Handler(run_s=0.08)
    batcher = DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.005)

    async def main():
        first = asyncio.create_task(batcher(0))
        later = []
        for i in range(1, 5):  # one every 10 ms while the first batch runs
            await asyncio.sleep(0.01)
            later.append(asyncio.create_task(batcher(i)))
        return await asyncio.gather(first, *later)

    assert run(main()) == [("done", i) for i in range(5)]
    assert handler.batches == [[0], [1, 2, 3, 4]]
    # They had waited longer than the delay already: the second batch starts at once.
    assert handler.started[1] - handler.ended[0] < 0.004


def test_an_idle_batcher_waits_the_delay_for_company_and_no_longer():
    handler = Handler()
    batcher = DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.03)

    async def main():
        t0 = time.monotonic()
        a = asyncio.create_task(batcher("a"))
        await asyncio.sleep(0.01)
        b = asyncio.create_task(batcher("b"))
        await asyncio.gather(a, b)
        return time.monotonic() - t0

    waited = run(main())
    assert handler.batches == [["a", "b"]]
    assert 0.025 <= waited < 0.2, waited  # the delay from the oldest's arrival, not from b's


def test_a_full_batch_runs_without_waiting_and_the_size_is_respected_in_order():
    handler = Handler()
    batcher = DynamicBatcher(handler, max_batch_size=3, max_queue_delay_s=5.0)

    async def main():
        t0 = time.monotonic()
        await asyncio.gather(*(batcher(i) for i in range(6)))
        return time.monotonic() - t0

    assert run(main()) < 1.0  # never the 5 s delay: each batch was full
    assert handler.batches == [[0, 1, 2], [3, 4, 5]]


def test_zero_delay_runs_what_is_queued_at_once():
    handler = Handler(run_s=0.02)
    batcher = DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.0)

    async def main():
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.005)
        rest = [asyncio.create_task(batcher(i)) for i in (1, 2)]
        await asyncio.gather(first, *rest)

    run(main())
    assert handler.batches == [[0], [1, 2]]


def test_a_batch_holds_one_key_and_the_oldest_key_goes_first():
    handler = Handler()
    batcher = DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.01, key=lambda item: item[0])

    async def main():
        await asyncio.gather(*(batcher(item) for item in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2)]))

    run(main())
    assert handler.batches == [[("a", 1), ("a", 2)], [("b", 1), ("b", 2)], [("c", 1)]]


def test_a_failing_batch_fails_its_own_requests_only():
    handler = Handler(fail_on="bad")
    batcher = DynamicBatcher(handler, max_batch_size=2, max_queue_delay_s=0.0)

    async def main():
        return await asyncio.gather(*(batcher(i) for i in ["x", "bad", "y", "z"]), return_exceptions=True)

    got = run(main())
    assert [type(g).__name__ for g in got[:2]] == ["ValueError", "ValueError"]
    assert got[2:] == [("done", "y"), ("done", "z")]


def test_a_handler_that_loses_a_result_fails_the_batch_with_the_counts():
    batcher = DynamicBatcher(Handler(results_short=True), max_batch_size=2, max_queue_delay_s=0.0)

    async def main():
        return await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)

    got = run(main())
    assert all(isinstance(g, RuntimeError) and "1 results for 2 requests" in str(g) for g in got), got


def test_a_caller_that_went_away_is_not_run():
    handler = Handler(run_s=0.03)
    batcher = DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.0)

    async def main():
        first = asyncio.create_task(batcher("first"))
        await asyncio.sleep(0.005)
        gone = asyncio.create_task(batcher("gone"))
        kept = asyncio.create_task(batcher("kept"))
        await asyncio.sleep(0.005)
        gone.cancel()
        return await asyncio.gather(first, kept)

    assert run(main()) == [("done", "first"), ("done", "kept")]
    assert handler.batches == [["first"], ["kept"]]


def test_close_fails_the_queued_requests_and_refuses_new_ones():
    handler = Handler(run_s=0.05)
    batcher = DynamicBatcher(handler, max_batch_size=1, max_queue_delay_s=0.0)

    async def main():
        running = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher(2))
        await asyncio.sleep(0.005)
        batcher.close()
        got = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(RuntimeError, match="closed"):
            await batcher(3)
        return got

    got = run(main())
    assert all(isinstance(g, RuntimeError) for g in got), got
    assert handler.batches == [[1]]


def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        DynamicBatcher(Handler(), max_batch_size=0, max_queue_delay_s=0.0)
    batcher = DynamicBatcher(Handler(), max_batch_size=1, max_queue_delay_s=0.0)
    with pytest.raises(ValueError, match="got -1"):
        batcher.set_batch_wait_timeout_s(-1)
