"""The coordinator across two Ray nodes (``ray.cluster_utils.Cluster``, both on this
host, two logical GPUs each): replicas land on both nodes, one coordinator sees all
four GPUs, and each GPU is governed by its own pressure.

Four BERT-tiny replicas, one whole logical GPU each, so every GPU of both nodes holds
exactly one. Pressure is injected with ``Coordinator.inject_external_bytes``; every
wait polls the coordinator's status until a deadline.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from serve_harness import ServeApp, application, free_port, start_serve, wait_for
from engine_runtime.units import MiB

HTTP_PORTS = range(18200, 18300)
TOTAL = 256 * MiB
ARGS = {
    "model_dirs": ["."],
    "coordinator": {"poll_interval_s": 0.2, "min_dwell_s": 0.5, "admission_deadline_s": 1.0,
                    "virtual_gpu_memory_bytes": TOTAL},
    "models": [{"name": "encoder", "source": {"architecture": "bert-tiny", "seed": 0},
                "input": {"min_batch": 1, "opt_batch": 4, "max_batch": 8, "seq_len": 16},
                "backend": "pytorch", "mode": "static", "pin": "auto", "lazy": False,
                "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005}}],
}
DEPLOYMENTS = {"encoder": {"num_replicas": 4, "max_ongoing_requests": 16,
                           "ray_actor_options": {"num_gpus": 1, "num_cpus": 0.25}}}


@dataclass
class TwoNodes:
    node_ids: list[str]
    coordinator: Any
    handle: Any
    inputs: np.ndarray
    reference: np.ndarray

    def gpus(self) -> dict[str, dict]:
        import ray

        return {g["gpu"]: g for g in ray.get(self.coordinator.status.remote(), timeout=10)["gpus"]
                if g["replicas"]}

    def modes(self) -> dict[str, str]:
        return {uuid: g["replicas"][0]["mode"] for uuid, g in self.gpus().items()}

    def inject(self, gpu: str, nbytes: int) -> None:
        import ray

        # By keyword: once (this module run after another in one pytest process) the driver's
        # handle got Ray's stand-in signature for a class it could not load,
        # (_ray_trace_ctx=None, **kwargs), which refuses positional arguments.
        ray.get(self.coordinator.inject_external_bytes.remote(gpu_uuid=gpu, nbytes=int(nbytes)), timeout=10)

    def check_answers(self, calls: int) -> None:
        for _ in range(calls):
            out = self.handle.infer.remote({"input_ids": self.inputs}).result(timeout_s=60)
            np.testing.assert_allclose(out["output"], self.reference, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.config import AppConfig
    from deployments.coordinator import get_existing
    from deployments.engine_factory import make_engine

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    node_ids = []
    try:
        cluster.add_node(num_cpus=2, num_gpus=2)
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        cluster.wait_for_nodes()
        node_ids = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert len(node_ids) == 2
        port = free_port(HTTP_PORTS)
        ServeApp(http_port=port, client=start_serve(port)).deploy(
            [application(ARGS, deployments=DEPLOYMENTS)], timeout_s=240)
        ids = np.random.default_rng(1).integers(0, 1000, (2, 16), dtype=np.int64)
        cfg = AppConfig.model_validate(ARGS)
        engine = make_engine(cfg.models[0], cfg)
        try:
            reference = engine.infer({"input_ids": ids})["output"]
        finally:
            engine.close()
        nodes = TwoNodes(node_ids, wait_for(lambda: get_existing(), 30.0, "the coordinator actor"),
                         serve.get_deployment_handle("encoder", app_name="ebb"), ids, reference)
        wait_for(lambda: len(nodes.gpus()) == 4 and set(nodes.modes().values()) == {"static"}, 60.0,
                 "4 GPUs, each with one static replica")
        yield nodes
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for node_id in node_ids:
            for path in glob.glob(f"/dev/shm/ebb-budget-*{node_id[:12]}*"):
                os.unlink(path)


def test_replicas_land_on_both_nodes(two_nodes):
    gpus = two_nodes.gpus()
    assert len(gpus) == 4
    nodes = {g["replicas"][0]["node_id"] for g in gpus.values()}
    assert nodes == set(two_nodes.node_ids)
    # Each replica's GPU is named after its own node: the budgets of two nodes never mix.
    for uuid, g in gpus.items():
        assert uuid.startswith(f"vgpu-{g['replicas'][0]['node_id'][:12]}-")
    two_nodes.check_answers(4)


def test_each_gpu_is_governed_by_its_own_pressure(two_nodes):
    gpus = two_nodes.gpus()
    # One GPU of each node in turn.
    per_node = {g["replicas"][0]["node_id"]: uuid for uuid, g in sorted(gpus.items())}
    for node_id, pressed in per_node.items():
        # Everything but 8 MiB taken: above every watermark, yet room for dynamic calls.
        g = gpus[pressed]
        two_nodes.inject(pressed, TOTAL - (g["used_bytes"] - g["replicas"][0]["held_bytes"]) - 8 * MiB)
        modes = wait_for(lambda: (m := two_nodes.modes())[pressed] == "dynamic" and m, 20.0,
                         f"the replica on {pressed} to go dynamic")
        assert all(mode == "static" for uuid, mode in modes.items() if uuid != pressed), modes
        two_nodes.check_answers(2)
        two_nodes.inject(pressed, 0)
        wait_for(lambda: set(two_nodes.modes().values()) == {"static"}, 20.0, "every replica static again")
    import ray

    history = ray.get(two_nodes.coordinator.status.remote(), timeout=10)["history"]
    assert [(h["gpu"], h["new_mode"]) for h in history] == [
        (uuid, mode) for uuid in per_node.values() for mode in ("dynamic", "static")]
