"""What a replica reports and what it does with the coordinator's answer, as tables."""

from __future__ import annotations

import pytest

from deployments.gpu_identity import GpuIdentity
from deployments.messages import Directive
from deployments.reporting import Actions, ReplicaIdentity, directive_actions, engine_figures, make_report
from engine_runtime.stats import StatsSnapshot
from engine_runtime.units import MiB

CHUNK = 64 * MiB


@pytest.mark.parametrize(("directive", "state", "actions"), [
    # Budget: set when given, left when the GPU is unknown.
    (Directive(None, 5 * MiB), {}, Actions(budget_bytes=5 * MiB)),
    (Directive(None, None), {}, Actions()),
    # Mode: an auto replica follows; a pinned one keeps its pin; no switch to where it is.
    (Directive("static", None), {}, Actions(switch_to="static")),
    (Directive("dynamic", None), {}, Actions()),
    (Directive("static", None), {"pin": "dynamic"}, Actions()),
    (Directive("dynamic", None), {"pin": "static"}, Actions(switch_to="static")),
    (Directive(None, None), {"pin": "static"}, Actions(switch_to="static")),
    # Pool: whole chunks, rounded up; nothing where it is there already, unknown, or no pool.
    (Directive(None, None, pool_target_bytes=10 * CHUNK - 1), {"chunk": CHUNK, "capacity": 4}, Actions(pool_chunks=10)),
    (Directive(None, None, pool_target_bytes=10 * CHUNK), {"chunk": CHUNK, "capacity": 10}, Actions()),
    (Directive(None, None, pool_target_bytes=0), {"chunk": CHUNK, "capacity": 10}, Actions(pool_chunks=0)),
    (Directive(None, None, pool_target_bytes=None), {"chunk": CHUNK, "capacity": 10}, Actions()),
    (Directive(None, None, pool_target_bytes=CHUNK), {}, Actions()),
    # All at once.
    (Directive("static", 7, pool_target_bytes=2 * CHUNK), {"chunk": CHUNK, "capacity": 1},
     Actions(budget_bytes=7, pool_chunks=2, switch_to="static")),
])
def test_directive_actions(directive, state, actions):
    got = directive_actions(directive, pin=state.get("pin", "auto"), mode=state.get("mode", "dynamic"),
                            pool_chunk_bytes=state.get("chunk"), pool_capacity_chunks=state.get("capacity"))
    assert got == actions


IDENTITY = ReplicaIdentity("r1", "resnet", GpuIdentity("vgpu-node0-0", None, True, "node0"), 100,
                           "in use", 4 * CHUNK)
FIGURES = {"mode": "dynamic", "mechanism": "vmm-pool", "context_bytes": 40, "held_bytes": 0,
           "request_rate_per_s": 2.0, "latency_static_s": None, "latency_dynamic_s": 0.01, "in_flight": 1,
           "loaded": True}


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, {"virtual": True, "pool_bytes": None, "pool_chunk_bytes": None, "pool_max_bytes": None}),
    ({"pool_bytes": 2 * CHUNK, "pool_chunk_bytes": CHUNK},
     {"virtual": True, "pool_bytes": 2 * CHUNK, "pool_chunk_bytes": CHUNK, "pool_max_bytes": 4 * CHUNK}),
    # A replica with the NVML fault injected reports its virtual GPU as a real one.
    ({"fault_injected": True}, {"virtual": False}),
])
def test_make_report(kwargs, expected):
    r = make_report(IDENTITY, FIGURES, pid=42, pin="auto", reading=None, reading_error=None, **kwargs)
    assert {k: getattr(r, k) for k in expected} == expected
    assert (r.replica_id, r.model, r.gpu, r.node_id, r.pid, r.weights_bytes, r.context_bytes, r.pool) == (
        "r1", "resnet", "vgpu-node0-0", "node0", 42, 100, 40, "in use")


def _stats(peak: int) -> StatsSnapshot:
    fields = {f: 0 for f in StatsSnapshot.__dataclass_fields__}
    fields.update(peak_context_bytes=peak, context_bytes_held=3, request_rate_per_s=1.5, calls_in_flight=2,
                  latency_p50_s={"dynamic": 0.02})
    return StatsSnapshot(**fields)


@pytest.mark.parametrize(("loaded", "largest", "context_bytes"), [
    (True, 500, 500),     # loaded: its largest call
    (False, None, 77),    # not yet: the most it held so far
    (True, None, 77),
])
def test_engine_figures(loaded, largest, context_bytes):
    f = engine_figures(mode="dynamic", mechanism="vmm-arena", loaded=loaded, stats=_stats(77),
                       largest_context_bytes=largest)
    assert f["context_bytes"] == context_bytes
    assert (f["held_bytes"], f["in_flight"], f["latency_dynamic_s"], f["latency_static_s"]) == (3, 2, 0.02, None)
    make_report(IDENTITY, f, pid=1, pin="auto", reading=None, reading_error=None)  # every field accounted for
