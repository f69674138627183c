"""The application ``bench_serving`` measures, as a Serve config like ``cluster.yaml``: an
image model ("r50": ResNet-50 at 224 px on a GPU, ResNet-18 at 32 px on the CPU, or any
built-in architecture and size) beside a small encoder ("bert"), with the serving path's
choices as arguments (replicas, batch wait, the image model inside the ingress, Serve's
access log), and the local Ray cluster and Serve that run it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchlib import ROOT


@dataclass(frozen=True)
class ImageModel:
    """The image model under test ("r50" in the app): ResNet-50 at 224 px on a GPU,
    ResNet-18 at 32 px on the CPU, or what ``--image-arch``/``--image-size`` choose
    (``pool-linear``: ResNet's input and output with almost no compute, so that what is
    timed is the serving path itself)."""

    arch: str
    size: int
    max_batch: int
    opt_batch: int

    @staticmethod
    def choose(gpu: bool, arch: str | None = None, size: int | None = None, batch: int = 1) -> ImageModel:
        if gpu:
            return ImageModel(arch or "resnet50", size or 224, max(32, batch), 8)
        return ImageModel(arch or "resnet18", size or 32, max(4, batch), 2)

    def sample(self, batch: int) -> np.ndarray:
        return np.random.default_rng(0).random((batch, 3, self.size, self.size), dtype=np.float32)



def app_config(gpu: bool, http_port: int, grpc_port: int, image: ImageModel, ingress_replicas: int | None = None,
               model_replicas: int = 1, batch_wait_s: float = 0.002, embed: bool = False,
               access_log: bool = False, same_loop: bool = True) -> dict[str, Any]:
    """A Serve config like cluster.yaml: the image model and a small encoder; ``embed``:
    the image model runs inside each ingress replica (``args.embed``), which then takes
    its GPU share. ``access_log``: Serve's line per request in each replica's log, off by
    default here as in Triton (a CPU profile of the ingress put a fifth of its own,
    non-engine time into writing those lines and checking the log file's rollover).
    ``same_loop``: the ingress on Serve's own event loop, as cluster.yaml has it; False:
    Serve's default, its code on a second loop in a thread of its own."""
    # On a GPU both stay static (the coordinator would not move them); on the CPU as cluster.yaml.
    common = {"backend": "pytorch", "mode": "static", "pin": "static" if gpu else "auto", "lazy": False}
    model = {"name": "r50", "source": {"architecture": image.arch, "seed": 0},
             "input": {"min_batch": 1, "opt_batch": image.opt_batch, "max_batch": image.max_batch,
                       "image_size": image.size},
             "precision": "fp32", **common,
             "batching": {"max_batch_size": image.max_batch, "batch_wait_timeout_s": batch_wait_s}}
    arch, max_batch, seq_len = ("bert-base", 6, 96) if gpu else ("bert-tiny", 4, 16)
    encoder = {"name": "bert", "source": {"architecture": arch, "seed": 0},
               "input": {"min_batch": 1, "opt_batch": 2, "max_batch": max_batch, "seq_len": seq_len}, **common,
               "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": batch_wait_s}}
    gpus = 0.4 if gpu else 0.25
    args = {"model_dirs": ["."], "http": {"max_body_bytes": 256 << 20, "retry_after_s": 1},
            "coordinator": {"poll_interval_s": 0.5, "admission_deadline_s": 5.0,
                            "virtual_gpu_memory_bytes": 4 << 30},
            "models": [model, encoder]}
    # Replicas of one model share the card (num_gpus each, at most 1 in all).
    gpus = min(gpus, round(0.9 / (2 * model_replicas), 3))
    model_opts = {"num_replicas": model_replicas, "max_ongoing_requests": 128,
                  "ray_actor_options": {"num_gpus": gpus, "num_cpus": 0.25}}
    ingress = {"name": "EbbIngress", "num_replicas": ingress_replicas or (2 if gpu and not embed else 1),
               "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.5}}
    if same_loop:
        from deployments.ingress import SAME_LOOP_ENV

        ingress["ray_actor_options"]["runtime_env"] = {"env_vars": dict(SAME_LOOP_ENV)}
    deployments = [{"name": "r50", **model_opts}, {"name": "bert", **model_opts}, ingress]
    if embed:
        args["embed"] = "r50"
        ingress["ray_actor_options"]["num_gpus"] = gpus
        deployments.pop(0)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": {"port": grpc_port,
                         "grpc_servicer_functions": [
                             "deployments.grpc_service.add_GRPCInferenceServiceServicer_to_server"]},
        "applications": [{
            "name": "ebb", "route_prefix": "/", "import_path": "deployments.app:build_app", "args": args,
            "logging_config": {"enable_access_log": access_log},
            "deployments": deployments,
        }],
    }


def start_app(config: dict[str, Any], timeout_s: float = 600.0, wait_ready: bool = True) -> None:
    """Ray, Serve (HTTP and gRPC proxies) and the application, in this process's cluster;
    ``wait_ready``: until the proxy's port answers ready (not with direct ingress, where
    the ingress replica listens on a port of its own: ``serving_path.direct_ports``)."""
    import logging

    import ray
    import requests
    from ray.serve._private import api as serve_private_api
    from ray.serve.schema import ServeDeploySchema

    # The proxy imports deployments.grpc_service: every process of this local cluster
    # inherits the driver's environment.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        gpus = 0
    ray.init(address="local", num_gpus=None if gpus else 1, num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    client = serve_private_api.serve_start(http_options=config["http_options"], grpc_options=config["grpc_options"])
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    if not wait_ready:
        return
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
