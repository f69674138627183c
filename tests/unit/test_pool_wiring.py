"""The context pool wired into the deployments, without Ray or a GPU: the
``context_pool`` config, the fallback where no pool can run (a CPU host says why and
serves on), the lease as the admission, the pool's figures in reports and the
coordinator's status view, its target in directives, and the replica's client
applying that target (to a fake pool, and to a real owner with memfd chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.config import AppConfig, ConfigError, CoordinatorConfig, parse_app_config
from deployments.coordinator import CoordinatorState
from deployments.coordinator_client import CoordinatorClient, ReplicaPorts
from deployments.gpu_identity import GpuIdentity
from deployments.messages import Directive, ReplicaReport
from deployments.reporting import ReplicaIdentity
from deployments.engine_factory import POOL_IN_USE, join_context_pool, make_engine
from engine_runtime.memory.admission import SharedBudget, UnboundedAdmission
from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.memory import ContextMechanism
from engine_runtime.memory.pool import DEFAULT_CHUNK_BYTES, PoolUnavailableError
from engine_runtime.pressure import GpuPressure
from cuda_fake import CHUNK
from test_lease_table import owner  # noqa: F401 - the memfd-backed owner fixture
from engine_runtime.units import MiB, GiB

REAL = "GPU-11111111-2222-3333-4444-555555555555"
MODEL = {"name": "r18", "source": {"architecture": "resnet18"},
         "input": {"max_batch": 2, "image_size": 32}, "device": "cpu"}


def app(**pool) -> AppConfig:
    return parse_app_config({"models": [MODEL], "context_pool": pool})


# -- config ---------------------------------------------------------------------------


def test_context_pool_is_off_by_default_with_the_pool_s_chunk_size():
    cfg = parse_app_config({"models": [MODEL]}).context_pool
    assert not cfg.enabled and cfg.chunk_bytes == DEFAULT_CHUNK_BYTES
    assert cfg.initial_bytes == 0 and cfg.max_bytes is None


@pytest.mark.parametrize("pool, message", [
    ({"enable": True}, r"context_pool\.enable: Extra inputs are not permitted"),
    ({"chunk_bytes": 3 * MiB}, r"context_pool: .*multiple of 2097152"),
    ({"chunk_bytes": 0}, r"context_pool\.chunk_bytes"),
    ({"max_bytes": 32 * MiB}, r"max_bytes 33554432 is below one chunk"),
    ({"initial_bytes": 2 * GiB, "max_bytes": GiB}, r"initial_bytes <= max_bytes"),
    ({"initial_bytes": -1}, r"context_pool\.initial_bytes"),
])
def test_context_pool_config_errors_name_the_key(pool, message):
    with pytest.raises(ConfigError, match=message):
        app(**pool)


def test_context_pool_config_accepts_a_capped_pool():
    cfg = app(enabled=True, chunk_bytes=32 * MiB, initial_bytes=GiB, max_bytes=4 * GiB).context_pool
    assert cfg.enabled and cfg.chunk_bytes == 32 * MiB and cfg.max_bytes == 4 * GiB


# -- fallback: no pool here, the engine's own mechanism serves ------------------------------


def test_disabled_pool_says_so():
    a = app()
    client, status = join_context_pool(a.models[0], a, 0)
    assert client is None and "disabled" in status


def test_no_cuda_device_falls_back_and_says_why():
    a = app(enabled=True)
    client, status = join_context_pool(a.models[0], a, None)
    assert client is None and status == "unavailable: this replica has no CUDA device"


def test_pool_unavailable_on_this_host_falls_back_and_the_engine_works(tmp_path, monkeypatch):
    from engine_runtime.memory.pool import pool_available

    if pool_available(0):
        pytest.skip("this host can pool (a GPU is visible)")
    monkeypatch.setenv("EBB_POOL_DIR", str(tmp_path))
    a = app(enabled=True)
    model = a.models[0].model_copy(update={"device": "auto"})
    client, status = join_context_pool(model, a, 0)
    assert client is None
    assert status.startswith("unavailable: ") and status != "unavailable: "  # the probe's reason
    engine = make_engine(model, a, cuda_index=None, physical_source=client)
    try:
        out = engine.infer({"input": np.zeros((2, 3, 32, 32), np.float32)})
        assert out["output"].shape[0] == 2
        assert engine.mechanism is ContextMechanism.HOST_ACCOUNTING
    finally:
        engine.close()


def test_a_replica_on_the_pool_does_not_also_wait_on_the_budget(tmp_path):
    a = app(enabled=True)
    budget = SharedBudget("test-pool-wiring", 1, directory=str(tmp_path))
    try:
        plain = make_engine(a.models[0], a, admission=budget)
        pooled = make_engine(a.models[0], a, admission=budget, physical_source=SimpleNamespace(
            mechanism=ContextMechanism.VMM_POOL))
        assert plain.admission is budget
        assert isinstance(pooled.admission, UnboundedAdmission)  # the lease is the admission
    finally:
        budget.close()


# -- reports, directives and the status view -------------------------------------------


def reading(used_gib: float, total_gib: float = 80.0) -> GpuPressure:
    total, used = int(total_gib * GiB), int(used_gib * GiB)
    return GpuPressure(uuid=REAL, index=0, total_bytes=total, used_bytes=used, reserved_bytes=0,
                       free_bytes=total - used, utilization_pct=0.0)


def report(rid: str, used_gib: float, *, pool_gib: float | None, ctx: int = GiB, mode: str = "dynamic",
           max_bytes: int | None = None) -> ReplicaReport:
    pooled = pool_gib is not None
    return ReplicaReport(
        replica_id=rid, model=f"model-{rid}", pid=1000, node_id="node0", gpu=REAL, virtual=False, pin="auto",
        mode=mode, mechanism="vmm-pool" if pooled else "vmm-arena", weights_bytes=GiB, context_bytes=ctx,
        held_bytes=0, request_rate_per_s=1.0, latency_static_s=0.005, latency_dynamic_s=0.006, in_flight=0,
        loaded=True, reading=reading(used_gib),
        pool=POOL_IN_USE if pooled else "unavailable: no CUDA device visible",
        pool_bytes=None if not pooled else int(pool_gib * GiB),
        pool_chunk_bytes=None if not pooled else 64 * MiB, pool_max_bytes=max_bytes)


def test_directives_carry_the_pool_target_to_pooled_replicas_only():
    state = CoordinatorState(CoordinatorConfig(min_dwell_s=0))
    # Room on the card: the pool grows to both pooled replicas calling at once (2 GiB).
    d = state.observe(report("a", 40, pool_gib=0.5), 0.0)
    assert d.pool_target_bytes == GiB  # only "a" is known yet
    d = state.observe(report("b", 40, pool_gib=0.5), 0.1)
    assert d.pool_target_bytes == 2 * GiB
    d = state.observe(report("c", 40, pool_gib=None), 0.2)
    assert d.pool_target_bytes is None
    # Pressure from another process: the pool shrinks to one call.
    d = state.observe(report("a", 76, pool_gib=2), 0.3)
    assert d.pool_target_bytes == GiB
    gpu = state.status(0.3)["gpus"][0]
    assert gpu["pool_bytes"] == 2 * GiB and gpu["pool_target_bytes"] == GiB
    pools = {r["replica_id"]: r["pool"] for r in gpu["replicas"]}
    assert pools == {"a": "in use", "b": "in use", "c": "unavailable: no CUDA device visible"}


def test_the_pool_target_respects_the_configured_cap():
    state = CoordinatorState(CoordinatorConfig())
    state.observe(report("a", 20, pool_gib=0, max_bytes=GiB), 0.0)
    d = state.observe(report("b", 20, pool_gib=0, max_bytes=GiB), 0.1)
    assert d.pool_target_bytes == GiB
    assert state.status(0.1)["gpus"][0]["pool_max_bytes"] == GiB


# -- the replica's client applies the target ------------------------------------------------


@dataclass
class FakePool:
    chunk_bytes: int = 64 * MiB
    capacity: int = 4
    fail: bool = False
    resizes: list[int] = field(default_factory=list)

    def snapshot(self):
        return SimpleNamespace(capacity=self.capacity, pool_bytes=self.capacity * self.chunk_bytes)

    def resize(self, nchunks: int) -> dict:
        if self.fail:
            raise PoolUnavailableError("owner at /dev/shm/x.sock unreachable", "cuda:0")
        self.resizes.append(nchunks)
        self.capacity = nchunks
        return {"capacity": nchunks, "error": ""}


def fake_replica(pool) -> ReplicaPorts:
    engine = SimpleNamespace(mode=SimpleNamespace(value="dynamic"))
    identity = ReplicaIdentity("r1", "m", GpuIdentity("vgpu-node0-0", None, True, "node0"), 0)
    return ReplicaPorts(identity=identity, engine=engine, admission=SimpleNamespace(set_capacity=None), pool=pool,
                        max_shapes={}, pin=lambda: "auto")


def test_the_client_resizes_its_pool_to_the_target_in_whole_chunks():
    pool = FakePool()
    client = CoordinatorClient(fake_replica(pool), CoordinatorConfig())
    client.apply(Directive(None, None, pool_target_bytes=10 * 64 * MiB - 1))
    assert pool.resizes == [10]
    client.apply(Directive(None, None, pool_target_bytes=10 * 64 * MiB))  # already there: no request
    client.apply(Directive(None, None, pool_target_bytes=None))  # unknown GPU: leave it
    assert pool.resizes == [10]
    client.apply(Directive(None, None, pool_target_bytes=0))
    assert pool.resizes == [10, 0]


def test_a_failing_owner_does_not_stop_the_client():
    pool = FakePool(fail=True)
    client = CoordinatorClient(fake_replica(pool), CoordinatorConfig())
    assert client.apply(Directive(None, None, pool_target_bytes=GiB)) is False
    assert "unreachable" in client.last_contact()["pool_error"]


def test_without_a_pool_the_target_is_ignored():
    client = CoordinatorClient(fake_replica(None), CoordinatorConfig())
    assert client.apply(Directive(None, None, pool_target_bytes=GiB)) is False


def test_the_client_resizes_a_real_owner_and_the_report_carries_its_bytes(owner):  # noqa: F811
    from engine_runtime.memory.pool import PoolPhysical

    with PoolPhysical(owner.socket_path, 0) as pool:
        replica = fake_replica(pool)
        client = CoordinatorClient(replica, CoordinatorConfig())
        client.apply(Directive(None, None, pool_target_bytes=12 * CHUNK))
        assert pool.snapshot().capacity == 12 and len(owner._handles) == 12
        client.apply(Directive(None, None, pool_target_bytes=3 * CHUNK))
        assert pool.snapshot().capacity == 3 and pool.snapshot().pool_bytes == 3 * CHUNK


def test_a_lease_larger_than_the_pool_grows_it_up_to_the_limit(owner):  # noqa: F811
    from engine_runtime.memory.pool import PoolPhysical

    with PoolPhysical(owner.socket_path, 0, grow_limit_chunks=10) as pool:
        assert pool.snapshot().capacity == 8
        lease = pool.acquire(10 * CHUNK, deadline_s=5.0)
        assert pool.snapshot().capacity == 10 and len(lease.pieces) == 10
        lease.release()
        with pytest.raises(ContextMemoryUnavailable):
            pool.acquire(11 * CHUNK, deadline_s=5.0)  # over the limit: refused at once
        assert pool.snapshot().capacity == 10
    with PoolPhysical(owner.socket_path, 0) as pool:  # no limit given: never grows
        with pytest.raises(ContextMemoryUnavailable):
            pool.acquire(11 * CHUNK, deadline_s=5.0)
        assert pool.snapshot().capacity == 10


def test_reports_carry_the_pool_status_and_bytes(owner):  # noqa: F811
    from engine_runtime.memory.pool import PoolPhysical

    a = app(enabled=True, max_bytes=GiB)
    engine = make_engine(a.models[0], a)
    try:
        desc = engine.describe()

        def replica(pool, pool_status):
            identity = ReplicaIdentity("r1", a.models[0].name, GpuIdentity("vgpu-node0-0", None, True, "node0"),
                                       desc.weights_bytes, pool_status, a.context_pool.max_bytes)
            return ReplicaPorts(identity=identity, engine=engine, admission=SimpleNamespace(), pool=pool,
                                max_shapes=desc.max_shapes(), pin=lambda: "auto")

        r = CoordinatorClient(replica(None, "unavailable: this replica has no CUDA device"),
                              a.coordinator).build_report()
        assert r.pool == "unavailable: this replica has no CUDA device" and r.pool_bytes is None
        with PoolPhysical(owner.socket_path, 0) as pool:
            r = CoordinatorClient(replica(pool, POOL_IN_USE), a.coordinator).build_report()
            assert (r.pool, r.pool_bytes, r.pool_chunk_bytes, r.pool_max_bytes) == ("in use", 8 * CHUNK, CHUNK, GiB)
    finally:
        engine.close()
