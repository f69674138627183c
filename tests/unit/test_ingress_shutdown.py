"""The ingress gives back its JSON worker processes' named semaphores when Serve shuts it down.

A ``ProcessPoolExecutor`` holds named POSIX semaphores (``/dev/shm/sem.mp-*``, five per
pool); they are unlinked when the objects holding them are collected. Serve calls the
replica's ``__del__`` and then kills the process, so whatever is not collected by then
stays in /dev/shm for good: five files per ingress replica that had parsed a large body.
"""

from __future__ import annotations

import asyncio
import json
import os

from deployments.body_intake import BodyIntake
from deployments.config import HttpConfig
from deployments.ingress import EbbIngress


def _semaphores() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("sem.mp-")}


def test_shutdown_unlinks_the_worker_pool_s_semaphores():
    cls = EbbIngress.func_or_class  # Serve's ASGI wrapper around the class below
    ebb_ingress = next(c for c in cls.__mro__ if c.__module__ == "deployments.ingress" and "__del__" in vars(c)
                       and not asyncio.iscoroutinefunction(vars(c)["__del__"]))
    # Made from the class itself: the wrapper's own __del__ is a coroutine only Serve awaits.
    ingress = object.__new__(ebb_ingress)
    ingress.http = HttpConfig(parse_processes=1, parse_in_process_bytes=1)
    ingress.intake = BodyIntake(ingress.http)
    before = _semaphores()
    parsed = asyncio.run(ingress.intake.parse(json.loads, bytearray(b'{"inputs": []}'), binary=False))
    assert parsed == {"inputs": []}
    assert _semaphores() - before, "the worker pool made no named semaphores: nothing to check"
    ebb_ingress.__del__(ingress)  # what Serve's graceful shutdown calls
    assert not (_semaphores() - before), "the worker pool's semaphores outlived the ingress's shutdown"
    assert ingress.intake._processes is None
