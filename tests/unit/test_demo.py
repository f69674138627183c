"""The demo's checks before it starts Ray (no Ray here)."""

from __future__ import annotations

import socket

from deployments import demo


def test_a_taken_http_port_is_refused_before_ray_starts(capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start when the port is taken")

    monkeypatch.setattr("ray.init", no_ray)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert demo.main(["--once", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is in use" in err and "--port" in err
