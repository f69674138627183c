"""`ebb status`: reads the status JSON over HTTP and prints GPUs and replicas."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from deployments import cli
from engine_runtime.units import MiB

STATUS = {
    "gpus": [{
        "gpu": "GPU-aaaa", "virtual": False, "known": True, "total_bytes": 80 * 1024 * MiB,
        "used_bytes": 40 * 1024 * MiB, "pressure": 0.5, "external_bytes": 0, "budget_bytes": 30 * 1024 * MiB,
        "replicas": [
            {"replica_id": "r1", "model": "resnet50", "mode": "static", "desired_mode": "dynamic",
             "mechanism": "vmm-arena", "held_bytes": 434 * MiB, "context_bytes": 434 * MiB,
             "request_rate_per_s": 12.5, "last_decision": "GPU-aaaa at 93.0% is above the high watermark"},
        ],
    }],
    "history": [{"time_s": 0.0, "model": "resnet50", "replica_id": "r1", "new_mode": "dynamic",
                 "reason": "GPU-aaaa at 93.0% is above the high watermark"}],
}


def test_render_shows_gpu_and_replica_figures():
    text = cli.render(STATUS)
    assert "GPU-aaaa" in text and "pressure 50.0%" in text and "budget 30,720 MiB" in text
    assert "resnet50" in text and "static>dynamic" in text and "434.0" in text and "12.50" in text
    assert "above the high watermark" in text
    assert "no replicas have reported yet" in cli.render({"gpus": []})


@pytest.fixture()
def server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = json.dumps(STATUS).encode() if self.path == "/ebb/status" else b"{}"
            self.send_response(200 if self.path == "/ebb/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_status_command_prints_table_and_json(server, capsys):
    assert cli.main(["status", "--url", server]) == 0
    assert "resnet50" in capsys.readouterr().out
    assert cli.main(["status", "--url", server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_command_says_why_when_unreachable(capsys):
    assert cli.main(["status", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the status from http://127.0.0.1:9/ebb/status" in err and "--url" in err


def test_render_lists_a_group_replica_s_models_with_tier_bytes_last_use_and_page_ins():
    import time

    now = time.time()
    group = {"replica_id": "g1", "model": "resnets", "group": "resnets", "mode": "dynamic", "mechanism": "vmm-arena",
             "held_bytes": 0, "context_bytes": 0, "weights_bytes": 196 * MiB, "request_rate_per_s": 3.0,
             "floor_bytes": 540 * MiB, "page_out_pending": ["resnet-b"],
             "models": [
                 {"name": "resnet-a", "tier": "gpu", "weights_bytes": 98 * MiB, "last_used_s": now - 2,
                  "page_ins": 3, "page_in_seconds_total": 0.006, "calls": 40},
                 {"name": "resnet-b", "tier": "gpu", "weights_bytes": 98 * MiB, "last_used_s": now - 300,
                  "page_ins": 0, "page_in_seconds_total": 0.0, "calls": 1},
                 {"name": "resnet-c", "tier": "host", "weights_bytes": 98 * MiB, "last_used_s": None,
                  "page_ins": 0, "page_in_seconds_total": 0.0, "calls": 0}]}
    status = {"gpus": [{**STATUS["gpus"][0], "replicas": [group]}],
              "history": [{"time_s": now, "model": "resnets", "replica_id": "g1", "new_mode": None,
                           "page_out": ["resnet-b"], "reason": "GPU-aaaa at 93.0% is above the high watermark"}]}
    text = cli.render(status)
    assert "process floor 540 MiB" in text and "group resnets: 3 models, weights on the GPU 196.0 MiB" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("resnet-")}
    assert rows["resnet-a"][:3] == ["resnet-a", "gpu", "98.0"] and rows["resnet-a"][-3:] == ["3", "2.00", "40"]
    assert rows["resnet-b"][1] == "gpu*" and rows["resnet-c"][1] == "host" and "never" in rows["resnet-c"]
    assert "g1 page out resnet-b:" in text


def test_render_says_where_a_configured_pool_is_unavailable():
    status = copy.deepcopy(STATUS)
    replica = status["gpus"][0]["replicas"][0]
    replica["pool"] = "unavailable: this replica has no CUDA device"
    assert "context pool: unavailable: this replica has no CUDA device" in cli.render(status)
    replica["pool"] = "not used: disabled in the config (context_pool.enabled)"
    assert "context pool" not in cli.render(status)
    replica["pool"] = "in use"
    assert "context pool: in use" in cli.render(status)
