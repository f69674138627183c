"""Helpers for the integration tests that run Ebb on real Ray and Serve.

Imported by name (``import serve_harness``), as the unit tests import ``trt_fake``;
the fixtures built on them are in this folder's ``conftest.py``. Waiting is always
for a condition, polled until a deadline, never a fixed sleep.
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests

T = TypeVar("T")

#: Serve's HTTP port for in-process clusters; another helper may use Serve's
#: default 8000 (and a port near it) on the same machine.
SERVE_HTTP_PORT_RANGE = range(18100, 18200)
APP_NAME = "ebb"


def free_port(candidates: range | None = None) -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (from ``candidates`` if given)."""
    for port in candidates or [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {candidates}")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy; return that.

    Exceptions raised by ``condition`` count as "not yet" and are reported if the
    deadline passes, so a test that times out says what it last saw.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            result = condition()
            if result:
                return result
            last = result
        except Exception as err:  # noqa: BLE001 - a condition not met yet
            last = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; last saw {last!r}")
        time.sleep(interval_s)


def view_summary(gpu_view: dict[str, Any] | None) -> str:
    """One line per replica of a coordinator GPU view, for failure messages."""
    if not gpu_view:
        return repr(gpu_view)
    rows = [f"{r['model']}:{r['replica_id'][-6:]} pid={r['pid']} mode={r['mode']}->{r['desired_mode']} "
            f"w={r['weights_bytes']} held={r['held_bytes']} ctx={r['context_bytes']} "
            f"loaded={r['loaded']} in_flight={r['in_flight']} seen={r['last_seen_s_ago']}s"
            for r in gpu_view["replicas"]]
    return (f"used={gpu_view['used_bytes']} external={gpu_view['external_bytes']} "
            f"reserved={gpu_view['reserved_bytes']} [" + "; ".join(rows) + "]")


def idle(gpu_view: dict[str, Any] | None) -> dict[str, Any] | None:
    """The view if no replica on it has a call in flight (a dynamic call's held bytes are
    in the GPU's figure while it runs), else None: a baseline must be read when idle."""
    if gpu_view and all(r["in_flight"] == 0 for r in gpu_view["replicas"]):
        return gpu_view
    return None


def replica_differences(before: dict[str, Any], now: dict[str, Any], replaced: dict[str, str]) -> list[str]:
    """How the live replicas of GPU view ``now`` differ from ``before`` in what sets the
    GPU's figure (identity, mode, weights, static context), ``replaced`` mapping a gone
    replica's id to its successor's (or to None where it is not replaced)."""
    rows_now = {r["replica_id"]: r for r in now["replicas"]}
    diffs = []
    for r in before["replicas"]:
        rid = r["replica_id"]
        successor = replaced.get(rid, rid)
        if successor is None:
            continue
        n = rows_now.get(successor)
        if n is None:
            diffs.append(f"{r['model']} replica {rid[-6:]} is gone")
            continue
        for key in ("mode", "weights_bytes", "loaded"):
            if n[key] != r[key]:
                diffs.append(f"{r['model']} {key}: {r[key]} -> {n[key]}")
    known = {replaced.get(r["replica_id"], r["replica_id"]) for r in before["replicas"]}
    diffs += [f"new replica {r['model']}:{rid[-6:]}" for rid, r in rows_now.items() if rid not in known]
    return diffs


def small_args(**coordinator: Any) -> dict[str, Any]:
    """Ebb's application ``args`` sized for two CPU cores: a ResNet-18 at 32x32 and a
    BERT-tiny at sequence length 16, both with a profile maximum batch of 4."""
    return {
        "model_dirs": ["."],
        "http": {"max_body_bytes": 1 << 20, "retry_after_s": 2},
        "coordinator": {"poll_interval_s": 0.2, "min_dwell_s": 0.0, "admission_deadline_s": 0.5,
                        "virtual_gpu_memory_bytes": 2 << 30, **coordinator},
        "models": [
            {"name": "resnet18", "source": {"architecture": "resnet18", "seed": 0},
             "input": {"min_batch": 1, "opt_batch": 4, "max_batch": 4, "image_size": 32},
             "backend": "pytorch", "mode": "static", "pin": "auto", "lazy": False,
             "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}},
            {"name": "encoder", "source": {"architecture": "bert-tiny", "seed": 0},
             "input": {"min_batch": 1, "opt_batch": 4, "max_batch": 4, "seq_len": 16},
             "backend": "pytorch", "mode": "dynamic", "pin": "dynamic", "lazy": False,
             "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}},
        ],
    }


def model_deployment_options(user_config: dict | None = None) -> dict[str, Any]:
    """Serve options of one model deployment: a quarter of a logical GPU, as in cluster.yaml."""
    options: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 16,
                               "ray_actor_options": {"num_gpus": 0.25, "num_cpus": 0.25}}
    if user_config is not None:
        options["user_config"] = user_config
    return options


def application(args: dict[str, Any], name: str = APP_NAME, route_prefix: str = "/",
                deployments: dict[str, dict] | None = None) -> dict[str, Any]:
    """One entry of a Serve config's ``applications`` list, as ``cluster.yaml`` writes it."""
    deployments = deployments or {m["name"]: model_deployment_options() for m in args["models"]}
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "deployments.app:build_app",
        "args": copy.deepcopy(args),
        "deployments": [{"name": n, **o} for n, o in deployments.items()]
                       + [{"name": "EbbIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}],
    }


@dataclass
class ServeApp:
    """A running Serve instance and the way to (re)deploy applications on it."""

    http_port: int
    client: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def deploy(self, applications: list[dict[str, Any]], timeout_s: float = 120.0) -> None:
        """Deploy a whole Serve config, as ``serve deploy`` does, and wait until every
        application is RUNNING.

        Deployed as a config (not ``serve.run`` of a bound app) because only config
        deploys give Serve a stable code version: a ``user_config`` change then
        reconfigures replicas in place instead of replacing them.
        """
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate({
            "proxy_location": "EveryNode",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "applications": applications,
        })
        self.client.deploy_apps(schema)
        names = [a["name"] for a in applications]
        last: dict[str, str] = {}

        def all_running() -> bool:
            last.update({n: self.app_status(n) for n in names})
            return all(s == "RUNNING" for s in last.values())

        try:
            wait_for(all_running, timeout_s, f"applications {names} to be RUNNING", interval_s=0.25)
        except TimeoutError as err:
            raise TimeoutError(f"{err}; statuses {last}; serve status {self.describe_status()}") from None

    def app_status(self, name: str) -> str:
        """The application's status; raises if its deployment failed."""
        from ray import serve

        app = serve.status().applications.get(name)
        if app is None:
            return "ABSENT"
        if app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {name!r} failed to deploy: {app.message}")
        return app.status.value

    @staticmethod
    def describe_status() -> dict[str, Any]:
        from ray import serve

        return {name: {"status": a.status.value, "message": a.message[:500],
                       "deployments": {d: (s.status.value, s.message[:300]) for d, s in a.deployments.items()}}
                for name, a in serve.status().applications.items()}

    def wait_ready(self, timeout_s: float = 60.0, prefix: str = "") -> None:
        """Poll the app's ``/v2/health/ready`` until it answers 200."""
        wait_for(lambda: requests.get(f"{self.url}{prefix}/v2/health/ready", timeout=5).status_code == 200,
                 timeout_s, f"{self.url}{prefix}/v2/health/ready to answer 200", interval_s=0.25)


def start_serve(http_port: int) -> Any:
    """Start Serve's controller and HTTP proxy on 127.0.0.1:``http_port``; return its client."""
    # Serve's public API has no call that deploys a config from Python; this is the
    # call `serve run config.yaml` and `serve deploy` end in (ray/serve/scripts.py).
    from ray.serve._private import api as serve_private_api

    return serve_private_api.serve_start(http_options={"host": "127.0.0.1", "port": http_port})


#: Serve's HTTP ports for the operations tests (metrics, autoscaling, weight updates),
#: apart from the others' so their clusters may run at the same time.
OPS_HTTP_PORT_RANGE = range(18300, 18400)


def metrics_options(port: int) -> dict[str, Any]:
    """``ray.init`` arguments that export metrics on ``port`` and report them twice a second."""
    return {"_metrics_export_port": port, "_system_config": {"metrics_report_interval_ms": 500}}


def metric_samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample named ``name`` on the node's Prometheus endpoint.

    Ray prefixes application metrics with ``ray_`` and counters end in ``_total``:
    pass the exported name (``ray_ebb_replica_calls_total``).
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def metric_value(port: int, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels``; None if there are none."""
    values = [v for lab, v in metric_samples(port, name) if all(lab.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None
