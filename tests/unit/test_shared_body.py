"""Large JSON bodies reach the parse worker through shared memory (deployments.shared_body):
read in place by the worker, never pickled, and closed on every path, cancellation and a
dead worker included."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time

import numpy as np
import pytest

from deployments import protocol, shared_body
from deployments.body_intake import BodyIntake
from deployments.config import HttpConfig
from deployments.shared_body import SharedBody, map_body
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec

pytestmark = pytest.mark.skipif(not shared_body.supported(), reason="needs memfd_create and /proc (Linux)")

DESC = EngineDescription(
    name="vec", inputs=(TensorSpec("x", "float32", (-1, 4096)),), outputs=(TensorSpec("y", "float32", (-1, 4096)),),
    profiles={"x": ShapeProfile((1, 4096), (4, 4096), (64, 4096))}, weights_bytes=0, backend="pytorch")


def _memfds() -> set[str]:
    """This process's open shared bodies, by name."""
    names = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:ebb-body-"):
            names.add(target)
    return names


class _Request:
    """What BodyIntake.read uses of a Starlette request: headers and ``receive``."""

    def __init__(self, body: bytes, chunk: int = 65536, declared: int | None = None, hang_up_after: int | None = None):
        self.headers = {"content-length": str(len(body) if declared is None else declared)}
        self._pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
        self._hang_up_after = hang_up_after

    async def receive(self) -> dict:
        if self._hang_up_after is not None and self._hang_up_after == 0:
            return {"type": "http.disconnect"}
        if self._hang_up_after is not None:
            self._hang_up_after -= 1
        piece = self._pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(self._pieces)}


def _body(batch: int = 8) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(0).random((batch, 4096), dtype=np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode(), x


def _parse() -> functools.partial:
    return functools.partial(protocol.parse_infer_request, content_type="application/json", header_length=None,
                             desc=DESC, max_body_bytes=1 << 30, reject_non_finite=False)


@pytest.fixture
def intake():
    intake = BodyIntake(HttpConfig(parse_processes=1, parse_in_process_bytes=64 * 1024))
    yield intake
    intake.close()


def test_a_large_json_body_is_parsed_by_the_worker_from_shared_memory(intake, monkeypatch):
    raw, x = _body()
    before = _memfds()

    async def go():
        body = await intake.read(_Request(raw), json=True)
        assert isinstance(body, SharedBody) and len(body) == len(raw)
        assert len(_memfds() - before) == 1
        return await intake.parse(_parse(), body, binary=False)

    # The pickle path would call this in the worker; the shared path must not reach it.
    import deployments.parse_worker as parse_worker

    monkeypatch.setattr(parse_worker, "parse_and_trim", None)
    parsed = asyncio.run(go())
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    assert _memfds() == before, "the shared body outlived its parse"


def test_small_binary_and_undeclared_bodies_keep_the_bytearray(intake):
    raw, _ = _body(batch=1)

    async def read(request, json):
        return await intake.read(request, json=json)

    assert isinstance(asyncio.run(read(_Request(raw[:1000]), True)), bytearray)  # below parse_in_process_bytes
    assert isinstance(asyncio.run(read(_Request(raw), False)), bytearray)  # binary extension: views of it
    undeclared = _Request(raw)
    undeclared.headers = {}
    body = asyncio.run(read(undeclared, True))
    assert isinstance(body, bytearray)
    # ... and that one still reaches the worker, by pickle.
    parsed = asyncio.run(intake.parse(_parse(), body, binary=False))
    assert parsed.inputs["x"].shape == (1, 4096)


def test_a_client_that_hangs_up_mid_body_leaves_no_shared_memory(intake):
    raw, _ = _body()
    before = _memfds()
    with pytest.raises(protocol.ClientDisconnected):
        asyncio.run(intake.read(_Request(raw, hang_up_after=3), json=True))
    assert _memfds() == before


def test_a_body_longer_than_declared_is_a_400_not_a_crash(intake):
    raw, _ = _body()
    with pytest.raises(protocol.ProtocolError) as err:
        asyncio.run(intake.read(_Request(raw, declared=len(raw) - 10), json=True))
    assert err.value.status_code == 400 and "declared" in str(err.value)


def test_a_malformed_large_body_gets_the_parser_s_400_and_is_closed(intake):
    raw = b'{"inputs": [' + b"1," * 100_000 + b"]"  # cut short: not JSON
    before = _memfds()

    async def go():
        body = await intake.read(_Request(raw), json=True)
        assert isinstance(body, SharedBody)
        return await intake.parse(_parse(), body, binary=False)

    with pytest.raises(protocol.ProtocolError) as err:
        asyncio.run(go())
    assert err.value.status_code == 400
    assert _memfds() == before


def test_a_cancelled_request_s_body_is_closed_when_the_worker_is_done(intake):
    raw, _ = _body(batch=64)  # a parse long enough to cancel during
    before = _memfds()

    async def go():
        body = await intake.read(_Request(raw), json=True)
        task = asyncio.create_task(intake.parse(_parse(), body, binary=False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    # The worker may still be reading it: closed when it finishes, not before.
    deadline = time.monotonic() + 10
    while _memfds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _memfds() == before, "the cancelled request's shared body was never closed"


def test_the_worker_refuses_a_descriptor_that_now_names_another_file():
    body = SharedBody(16)
    body.write(b'{"inputs": []}')
    source = body.source()
    body.close()
    fd = os.memfd_create("someone-else")  # the lowest free number: most likely the same one
    try:
        path_fd = int(source.path.rsplit("/", 1)[1])
        if fd != path_fd:
            os.dup2(fd, path_fd)
        with pytest.raises(FileNotFoundError, match="is gone"):
            map_body(source)
    finally:
        os.close(fd)
        if fd != path_fd:
            os.close(path_fd)


def test_a_dead_parse_worker_is_a_503_and_the_next_body_gets_a_new_one(intake):
    raw, x = _body()
    parse = _parse()

    async def once():
        body = await intake.read(_Request(raw), json=True)
        return await intake.parse(parse, body, binary=False)

    asyncio.run(once())  # the pool is up
    for pid in list(intake._processes._processes):
        os.kill(pid, signal.SIGKILL)
    before = _memfds()
    with pytest.raises(protocol.ProtocolError) as err:
        asyncio.run(once())
    assert err.value.status_code == 503 and "died" in str(err.value)
    assert _memfds() == before
    np.testing.assert_array_equal(asyncio.run(once()).inputs["x"], x)


def test_where_workers_cannot_map_shared_bodies_they_go_by_pickle(intake, monkeypatch, caplog):
    """A host whose /proc hides the ingress's descriptors from its workers (say): one probe
    finds it, says so once, and every large body goes by pickle, answered as before."""
    raw, x = _body()
    before = _memfds()
    monkeypatch.setattr(SharedBody, "source", lambda self: shared_body.BodySource(
        "/proc/self/fd/999999", self.name, self.size))

    async def once():
        body = await intake.read(_Request(raw), json=True)
        return body, await intake.parse(_parse(), body, binary=False)

    with caplog.at_level("WARNING", logger="deployments.body_intake"):
        first, parsed = asyncio.run(once())
    assert isinstance(first, SharedBody)  # not known yet when it arrived
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    assert "cannot map shared bodies" in caplog.text and "FileNotFoundError" in caplog.text
    second, parsed = asyncio.run(once())
    assert isinstance(second, bytearray)  # known now: no shared body made
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    assert _memfds() == before
