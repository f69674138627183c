"""What the ingress's worker processes run: parse one large JSON body, then give the
heap it used back to the OS.

A module of its own so that a spawned worker imports only the protocol (numpy,
orjson), not Ray or the web framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployments import shared_body
from deployments.heap import malloc_trim

__all__ = ["can_map", "parse_and_trim", "parse_shared_and_trim"]

#: Bodies at least this large hand their memory back to the OS once parsed.
TRIM_AFTER_BYTES = 8 * 2**20


def parse_and_trim(parse: Callable[[bytes | bytearray], Any], body: bytes | bytearray) -> Any:
    size = len(body)
    try:
        return parse(body)
    finally:
        del body
        if size >= TRIM_AFTER_BYTES:
            malloc_trim()


def parse_shared_and_trim(parse: Callable[[Any], Any], source: shared_body.BodySource) -> Any:
    """``parse`` of a body the ingress received into shared memory (deployments.shared_body),
    read in place: nothing of it was pickled or copied on its way here."""
    mapped = shared_body.map_body(source)
    try:
        return parse(mapped)
    finally:
        shared_body.close_quietly(mapped)
        if source.size >= TRIM_AFTER_BYTES:
            malloc_trim()


def can_map(source: shared_body.BodySource) -> str | None:
    """None where this worker can map the ingress's shared bodies; else why not (a host
    whose /proc hides other processes' descriptors, say)."""
    try:
        shared_body.close_quietly(shared_body.map_body(source))
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None
