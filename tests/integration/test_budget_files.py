"""The admission budget's file leaves /dev/shm with the last replica that used it.

One BERT-tiny replica on one logical GPU: while it serves, its GPU's budget file is
there; once the application is deleted (Serve's graceful shutdown closes the
replica), it is gone. Before, every cluster on a host without a GPU left a file named
after its node behind.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine_runtime.memory import budget_path
from serve_harness import APP_NAME, application, model_deployment_options, small_args, wait_for

SERVE_HTTP_PORTS = range(18500, 18600)


@pytest.fixture(scope="module")
def app(serve_instance):
    args = small_args()
    args["models"] = [m for m in args["models"] if m["name"] == "encoder"]
    serve_instance.deploy([application(args, deployments={"encoder": model_deployment_options()})],
                          timeout_s=120)
    from ray import serve

    return serve.get_deployment_handle("encoder", app_name=APP_NAME)


def test_the_budget_file_lives_while_a_replica_uses_it(app, ray_cluster):
    from ray import serve

    tokens = np.random.default_rng(0).integers(0, 1000, (2, 16), dtype=np.int64)
    assert app.infer.remote({"input_ids": tokens}).result()["output"].shape[0] == 2
    gpu = app.status.remote().result()["gpu"]
    assert ray_cluster[:12] in gpu  # a logical GPU, named after this cluster's node
    path = budget_path(gpu)
    assert os.path.exists(path)
    serve.delete(APP_NAME)
    wait_for(lambda: not os.path.exists(path), 60, f"{path} to be removed with the last replica")
