"""The ingress's failure answers that need no cluster: a client gone mid-body is not a bug."""

from __future__ import annotations

import logging

import pytest
from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect

from deployments.ingress import _status_of
from deployments.protocol import ClientDisconnected, ProtocolError


@pytest.mark.parametrize("exc", [ClientDisconnect(), ClientDisconnected(123), TaskCancelledError()],
                         ids=["starlette", "ebb", "serve-cancelled"])
def test_a_client_hanging_up_mid_body_is_no_internal_error(exc, caplog):
    with caplog.at_level(logging.DEBUG):
        status, message, _ = _status_of(exc, retry_after_s=1)
    assert status == 400 and "disconnected" in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_protocol_errors_carry_their_headers():
    status, _, headers = _status_of(ProtocolError(503, "busy", headers={"Retry-After": "2"}), retry_after_s=1)
    assert (status, headers) == (503, {"Retry-After": "2"})
