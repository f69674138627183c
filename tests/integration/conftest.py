"""Fixtures of the integration tests: a real Ray cluster and Serve, one per module.

Starting them costs tens of seconds on two cores, so they are module-scoped and
every test of a module shares them (as Ray Serve's own tests do). A module may set
``RAY_INIT_OPTIONS`` (more ``ray.init`` arguments), ``RAY_ENV`` (environment of the
cluster's processes) and ``SERVE_HTTP_PORTS`` (where Serve's port is picked).
"""

from __future__ import annotations

import glob
import logging
import os

import pytest

from serve_harness import SERVE_HTTP_PORT_RANGE, ServeApp, free_port, start_serve


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_over():
    """Each module starts without a Ray connection, whatever an earlier module left."""
    import ray

    if ray.is_initialized():
        logging.getLogger(__name__).warning("a previous module left Ray initialised; shutting it down")
        ray.shutdown()
    yield


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A local Ray cluster in this process: 4 CPUs and one logical GPU."""
    import ray

    env = getattr(request.module, "RAY_ENV", {})
    saved = {k: os.environ.get(k) for k in env}
    # Ray's processes inherit the environment of the process that starts them.
    os.environ.update(env)
    # address="local": a cluster of its own even where `ray start` runs one on this machine
    # (ray.init() would join that one, and refuse num_gpus there).
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, **getattr(request.module, "RAY_INIT_OPTIONS", {}))
    node_id = ray.get_runtime_context().get_node_id()
    try:
        yield node_id
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from ray import serve

        try:
            serve.shutdown()
        finally:
            # Even when Serve's shutdown raises: a cluster left connected here makes the
            # next module's ray.init fail ("called ray.init twice").
            ray.shutdown()
        # The per-GPU admission budgets live in /dev/shm, named after this node's
        # logical GPUs; the node is gone, so are they.
        for path in glob.glob(f"/dev/shm/ebb-budget-*{node_id[:12]}*"):
            os.unlink(path)


@pytest.fixture(scope="module")
def serve_instance(request, ray_cluster) -> ServeApp:
    """Serve started on a free port from SERVE_HTTP_PORT_RANGE, nothing deployed yet."""
    port = free_port(getattr(request.module, "SERVE_HTTP_PORTS", SERVE_HTTP_PORT_RANGE))
    return ServeApp(http_port=port, client=start_serve(port))
