"""The ingress sends small requests to the model replica by value and large ones by
reference (``http.by_value_max_bytes``; why: ``ingress._by_value_handles``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.config import HttpConfig
from deployments.ingress import EbbIngress, _ModelCounters, _by_value_handles, _payload_bytes


class Handle:
    """Records which handle took each call; ``options(_by_reference=False)`` gives its twin."""

    def __init__(self, log: list[str], kind: str = "by-reference") -> None:
        self.log, self.kind = log, kind
        self.infer = SimpleNamespace(remote=self._remote)

    def options(self, **kwargs):
        assert kwargs == {"_by_reference": False}, kwargs
        return Handle(self.log, "by-value")

    def _remote(self, inputs):
        self.log.append(self.kind)

        async def answer():
            return {"y": inputs["x"][:, :1]}

        return answer()


def _ingress(by_value_max_bytes: int, log: list[str]):
    cls = EbbIngress.func_or_class
    ebb_ingress = next(c for c in cls.__mro__ if c.__module__ == "deployments.ingress" and "_call" in vars(c))
    ingress = object.__new__(ebb_ingress)
    ingress.http = HttpConfig(by_value_max_bytes=by_value_max_bytes)
    ingress.handles = {"m": Handle(log)}
    ingress._by_value = _by_value_handles(ingress.handles) if by_value_max_bytes else {}
    ingress._counters = {"m": _ModelCounters()}
    return ingress


def _parsed(nbytes: int):
    x = np.zeros((1, nbytes // 4), np.float32)
    return SimpleNamespace(inputs={"x": x}, checked=lambda desc: {"x": x})


@pytest.mark.parametrize(("limit", "sizes", "expected"), [
    (1 << 20, [4, 1 << 20, (1 << 20) + 4], ["by-value", "by-value", "by-reference"]),
    (0, [4, 1 << 20], ["by-reference", "by-reference"]),
])
def test_the_transport_follows_the_request_s_tensor_bytes(limit, sizes, expected):
    log: list[str] = []
    ingress = _ingress(limit, log)
    for n in sizes:
        out = asyncio.run(ingress._call("m", None, _parsed(n)))
        assert out["y"].shape == (1, 1)
    assert log == expected
    assert ingress._counters["m"].success_count == len(sizes)


def test_by_value_max_bytes_must_not_be_negative():
    with pytest.raises(ValueError, match="by_value_max_bytes"):
        HttpConfig(by_value_max_bytes=-1)


def test_a_bytes_tensor_weighs_its_strings_not_its_pointers():
    strings = np.array([b"x" * 1000, b"y" * 3000], dtype=object)
    assert strings.nbytes == 16  # what a plain nbytes sum would have counted
    assert _payload_bytes({"text": strings, "ids": np.zeros(4, np.int64)}) == 4000 + 32
