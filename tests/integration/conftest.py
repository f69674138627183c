"""Fixtures of the integration tests: a real Ray cluster and Serve, one per module.

Starting them costs tens of seconds on two cores, so they are module-scoped and
every test of a module shares them (as Ray Serve's own tests do).
"""

from __future__ import annotations

import glob
import logging
import os

import pytest

from serve_harness import SERVE_HTTP_PORT_RANGE, ServeApp, free_port, start_serve


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster in this process: 4 CPUs and one logical GPU."""
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    node_id = ray.get_runtime_context().get_node_id()
    try:
        yield node_id
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        # The per-GPU admission budgets live in /dev/shm, named after this node's
        # logical GPUs; the node is gone, so are they.
        for path in glob.glob(f"/dev/shm/ebb-budget-*{node_id[:12]}*"):
            os.unlink(path)


@pytest.fixture(scope="module")
def serve_instance(ray_cluster) -> ServeApp:
    """Serve started on a free port from SERVE_HTTP_PORT_RANGE, nothing deployed yet."""
    port = free_port(SERVE_HTTP_PORT_RANGE)
    return ServeApp(http_port=port, client=start_serve(port))
