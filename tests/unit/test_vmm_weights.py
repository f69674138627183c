"""VmmWeights' sequence (reserve, map, copy, point the module at views; page-out, page-in) over a
stand-in for the CUDA driver, on a CPU.

The "device range" is a host buffer whose address the fake reserves; unmapping fills it
with garbage, as released physical memory would leave it, so only a correct copy back
on page-in gives the old outputs. The GPU test runs the real thing.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine_runtime import _cuda
from engine_runtime.backends import _weights_store
from engine_runtime.backends._weights_store import VmmWeights
from engine_runtime.architectures import build

GRAN = 2 * 2**20


class FakeDriver:
    def __init__(self) -> None:
        self.ranges: dict[int, torch.Tensor] = {}
        self.mapped: dict[int, object] = {}
        self.live_handles: set[int] = set()
        self.events: list[tuple] = []
        self.fail_create = 0
        self._next = 0

    def granularity(self, device):
        return GRAN

    def round_up(self, n, to):
        return (n + to - 1) // to * to

    def device(self, index):
        return contextlib.nullcontext()

    def address_reserve(self, nbytes, alignment):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.ranges[buf.data_ptr()] = buf
        self.events.append(("reserve", nbytes))
        return buf.data_ptr()

    def address_free(self, ptr, nbytes):
        self.events.append(("free", nbytes))
        del self.ranges[ptr]

    def mem_create(self, device, nbytes):
        if self.fail_create:
            self.fail_create -= 1
            raise _cuda.CudaError("cuMemCreate", 2)
        self._next += 1
        self.live_handles.add(self._next)
        self.events.append(("create", nbytes))
        return self._next

    def mem_release(self, handle):
        self.live_handles.remove(handle)
        self.events.append(("release",))

    def mem_map(self, ptr, nbytes, handle):
        assert ptr not in self.mapped, "mapped twice"
        self.mapped[ptr] = handle
        self.events.append(("map", ptr))

    def mem_unmap(self, ptr, nbytes):
        del self.mapped[ptr]
        self.ranges[ptr].fill_(0xAA)  # what the range reads as once its memory is gone
        self.events.append(("unmap", ptr))

    def set_access(self, device, ptr, nbytes):
        self.events.append(("access", ptr))


class FakeStream:
    def synchronize(self):
        pass


@pytest.fixture
def driver(monkeypatch):
    d = FakeDriver()
    for name in ("granularity", "round_up", "device", "address_reserve", "address_free", "mem_create",
                 "mem_release", "mem_map", "mem_unmap", "set_access"):
        monkeypatch.setattr(_cuda, name, getattr(d, name))
    monkeypatch.setattr(_weights_store, "_pinned", lambda n: torch.empty(n, dtype=torch.uint8))
    monkeypatch.setattr(_weights_store, "_device_view", lambda ptr, n, dev: d.ranges[ptr][:n])
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return d


def test_page_out_and_in_keep_addresses_and_outputs(driver):
    module = build("resnet18", seed=4, image_size=32).module
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = module(x)
    w = VmmWeights(module, 0, FakeStream())
    assert w.mapped_bytes % GRAN == 0 and w.mapped_bytes >= w.layout.tensor_bytes
    ptrs = [p.data_ptr() for p in module.parameters()] + [b.data_ptr() for b in module.buffers()]
    assert all(w.base <= p < w.base + w.mapped_bytes for p in ptrs)  # every tensor inside the range
    with torch.inference_mode():
        assert torch.equal(module(x), ref)

    w.prepare_host()
    host = w._host
    w.page_out()
    assert w._host is host  # the buffer made ahead is the one used: no allocation on page-out
    assert not w.resident and driver.mapped == {} and driver.live_handles == set()
    with torch.inference_mode():
        assert not torch.equal(module(x), ref)  # the range holds garbage now: it was really released

    w.page_in()
    assert w.resident and [e[0] for e in driver.events[-3:]] == ["create", "map", "access"]
    assert [p.data_ptr() for p in module.parameters()] + [b.data_ptr() for b in module.buffers()] == ptrs
    with torch.inference_mode():
        assert torch.equal(module(x), ref)
    w.close()
    assert driver.ranges == {} and driver.live_handles == set()


def test_failed_page_in_maps_nothing_and_a_retry_works(driver):
    module = build("resnet18", seed=5, image_size=32).module
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = module(x)
    w = VmmWeights(module, 0, FakeStream())
    w.page_out()
    driver.fail_create = 1
    with pytest.raises(_cuda.CudaError):
        w.page_in()
    assert not w.resident and driver.mapped == {} and driver.live_handles == set()
    w.page_in()
    with torch.inference_mode():
        assert torch.equal(module(x), ref)
    # Closing while paged out hands the module CPU copies from the host buffer.
    w.page_out()
    w.detach_to_cpu()
    w.close()
    with torch.inference_mode():
        assert torch.equal(module(x), ref)
