"""A starting engine's transient memory (eager warm-up, graph capture) is admitted as a
call's context is: held in the GPU's budget, waited for on the card, within the deadline."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.memory.admission import admitted_transient, warmup_estimate_bytes
from engine_runtime.units import MiB


class RecordingAdmission:
    def __init__(self) -> None:
        self.held = 0
        self.log: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def reserve(self, nbytes: int, deadline_s: float):
        self.held += nbytes
        self.log.append(("reserve", nbytes))
        try:
            yield
        finally:
            self.held -= nbytes
            self.log.append(("release", nbytes))


@pytest.mark.parametrize("prev_b, prev_peak, b, floor, expected", [
    (0, 0, 1, 64 * MiB, 64 * MiB),            # nothing measured yet: the floor
    (1, 10 * MiB, 2, 64 * MiB, 64 * MiB),      # scaled estimate below the floor
    (4, 100 * MiB, 8, 64 * MiB, 200 * MiB),    # linear in the batch
    (16, 300 * MiB, 32, 0, 600 * MiB),
    (3, 10, 4, 0, 14),                         # rounded up, never down
])
def test_warmup_estimate(prev_b, prev_peak, b, floor, expected):
    assert warmup_estimate_bytes(prev_b, prev_peak, b, floor) == expected


def test_bytes_are_held_in_the_budget_for_the_block_only():
    adm = RecordingAdmission()
    with admitted_transient(adm, 300 * MiB, 1.0, free_bytes=lambda: 10 * 2**30):
        assert adm.held == 300 * MiB
    assert adm.held == 0
    assert adm.log == [("reserve", 300 * MiB), ("release", 300 * MiB)]


def test_waits_for_the_card_to_have_the_bytes():
    free = {"bytes": 100 * MiB}

    def later() -> None:
        time.sleep(0.05)
        free["bytes"] = 1024 * MiB

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    with admitted_transient(RecordingAdmission(), 512 * MiB, 5.0, free_bytes=lambda: free["bytes"]):
        waited = time.monotonic() - t0
    assert free["bytes"] == 1024 * MiB  # it went in only once the memory was there
    assert waited < 5.0


def test_fails_with_the_figures_when_the_deadline_passes_and_gives_the_budget_back():
    adm = RecordingAdmission()
    ran = False
    with pytest.raises(ContextMemoryUnavailable) as info:
        with admitted_transient(adm, 512 * MiB, 0.05, free_bytes=lambda: 128 * MiB, where="cuda:0"):
            ran = True
    assert not ran
    err = info.value
    assert (err.requested_bytes, err.free_bytes, err.where) == (512 * MiB, 128 * MiB, "cuda:0")
    assert err.waited_s >= 0.05
    assert adm.held == 0


def test_a_refusing_budget_refuses_the_start():
    class Full:
        @contextlib.contextmanager
        def reserve(self, nbytes, deadline_s):
            raise ContextMemoryUnavailable(nbytes, 0, deadline_s, "budget")
            yield  # pragma: no cover

    with pytest.raises(ContextMemoryUnavailable):
        with admitted_transient(Full(), 64 * MiB, 0.01):
            pytest.fail("the block ran although the budget refused it")
