"""Triton's model repository extension, as far as Ebb has one: the index.

``POST /v2/repository/index`` (gRPC ``RepositoryIndex``) lists every model the
application serves with its state, which is how Triton's clients and tools ask a
server what it has (``tritonclient``'s ``get_model_repository_index``). Loading and
unloading (``.../models/{name}/load`` and ``unload``) are refused with a message that
says why: Ebb's models are its config's (``cluster.yaml``), changed with ``serve
deploy``, so that the coordinator, the budgets and Serve's replicas agree on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deployments.protocol._json import load_json
from deployments.protocol.status import ProtocolError

__all__ = ["model_control_refused", "parse_index_request", "repository_index"]

#: What an index request's JSON body may hold (the protocol's one field).
_INDEX_KEYS = frozenset({"ready"})


def parse_index_request(body: bytes) -> bool:
    """Whether only ready models are asked for: ``{"ready": true}``; an empty body (what
    tritonclient sends) or ``{}`` asks for all."""
    if not body.strip():
        return False
    obj = load_json(memoryview(body))  # malformed JSON: a 400 that says where
    if not isinstance(obj, dict):
        raise ProtocolError(400, f"repository index request: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _INDEX_KEYS)
    if unknown:
        raise ProtocolError(400, f"repository index request: unknown key(s) {unknown}; allowed: {sorted(_INDEX_KEYS)}")
    ready = obj.get("ready", False)
    if not isinstance(ready, bool):
        raise ProtocolError(400, f"repository index request: 'ready' must be true or false, got {ready!r}")
    return ready


def repository_index(ready: Mapping[str, bool], version: str, ready_only: bool = False) -> list[dict[str, Any]]:
    """One entry per served model, by name: ``READY``, or ``UNAVAILABLE`` with the reason
    (no replica answered its readiness check)."""
    entries = []
    for name in sorted(ready):
        if ready[name]:
            entries.append({"name": name, "version": version, "state": "READY", "reason": ""})
        elif not ready_only:
            entries.append({"name": name, "version": version, "state": "UNAVAILABLE",
                            "reason": "no replica of the model answered its readiness check"})
    return entries


def model_control_refused(name: str, action: str) -> ProtocolError:
    """The answer to a load or unload request (400 / INVALID_ARGUMENT)."""
    return ProtocolError(400, f"cannot {action} model {name!r}: Ebb serves the models of its config "
                              f"(cluster.yaml's args.models); add or remove one there and run `serve deploy`")
