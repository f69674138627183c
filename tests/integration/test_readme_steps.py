"""The README's operating steps ("With Ray's own CLI"), run as written, on a fresh HOME.

The commands are read from README.md's code block, so the documentation and this
test cannot drift apart. What a test on a shared machine must change is changed
here, and only that:

- ``ray start --head`` gets free ports and its own temporary folder appended (another
  Ray cluster may run on this machine);
- ``cluster.yaml`` is a copy with a free HTTP port, 32-pixel images (two cores) and a
  short ``coordinator.orphan_exit_s``, and ``localhost:8000`` is that port;
- ``RAY_DASHBOARD_ADDRESS`` points ``serve`` at this cluster's dashboard (the CLI's
  documented variable), ``PATH`` at this interpreter's ``ray``/``serve``, and
  ``PYTHONPATH`` at this checkout;
- ``ray stop`` stops every Ray process of this user, other people's clusters included,
  so it runs as written only with ``EBB_README_RAY_STOP=1`` (CI); otherwise this
  cluster's processes are stopped by id.

Between the steps the test calls a model over HTTP, and checks that the coordinator
actor exists while the app runs and is gone after ``serve shutdown``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from serve_harness import SERVE_HTTP_PORT_RANGE, free_port, wait_for
from test_serve_cli import BIN, REPO, _processes_under, _stop_processes

STEP_TIMEOUT_S = 420


def readme_steps() -> list[str]:
    """The command lines of the README's "With Ray's own CLI" block, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"\*\*With Ray's own CLI\.\*\*.*?```bash\n(.*?)```", text, re.DOTALL)
    assert block, "README.md has no 'With Ray's own CLI' bash block"
    lines = []
    for raw in block.group(1).splitlines():
        line = re.sub(r"\s+#\s.*$", "", raw).strip()  # a comment is ' # ...' after the command
        if line:
            lines.append(line)
    return lines


def test_the_readme_block_is_the_sequence_this_test_expects():
    steps = readme_steps()
    verbs = [" ".join(s.split()[:2]) for s in steps]
    assert verbs == ["export RAY_AUTH_MODE=token", "ray get-auth-token", "ray start", "serve deploy",
                     "until curl", "serve status", "serve shutdown", "ray stop"], steps


def run_steps(steps: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(steps) + "\n"
    with open(log, "ab") as out:
        out.write(f"\n$ ---\n{script}".encode())
        out.flush()
        done = subprocess.run(["bash", "-c", script], check=False, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              timeout=STEP_TIMEOUT_S)
    assert done.returncode == 0, f"steps failed ({done.returncode}):\n{log.read_text()[-6000:]}"


def coordinator_alive(env: dict[str, str], address: str, namespace: str) -> bool:
    probe = textwrap.dedent(f"""
        import ray
        from deployments.coordinator import get_existing
        ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
        try:
            get_existing({namespace!r})
            print("ALIVE")
        except ValueError:
            print("GONE")
    """)
    out = subprocess.run([sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return "ALIVE" in out.stdout


def test_readme_steps_on_a_fresh_home():
    steps = readme_steps()
    temp = Path(tempfile.mkdtemp(prefix="ebb-rd-", dir="/tmp"))  # short: Ray's socket paths live under it
    home = temp / "home"
    home.mkdir()
    port, dash, http_port = free_port(), free_port(), free_port(SERVE_HTTP_PORT_RANGE)
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["http_options"]["port"] = http_port
    (app,) = config["applications"]
    for model in app["args"]["models"]:
        if "image_size" in model["input"]:
            model["input"]["image_size"] = 32
    app["args"]["coordinator"]["orphan_exit_s"] = 5.0
    namespace = app["args"]["coordinator"].get("namespace", "ebb")
    config_path = temp / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO),
               RAY_DASHBOARD_ADDRESS=f"http://127.0.0.1:{dash}", RAY_USAGE_STATS_ENABLED="0")
    ray_stop_verbatim = os.environ.get("EBB_README_RAY_STOP") == "1"

    def adapt(line: str) -> str:
        if line.startswith("ray start --head"):
            return (f"{line} --port={port} --dashboard-port={dash} --temp-dir={temp / 'ray'} --num-cpus=4 "
                    f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()} "
                    f"--disable-usage-stats")
        return line.replace(" cluster.yaml", f" {config_path}").replace("localhost:8000", f"127.0.0.1:{http_port}")

    adapted = [adapt(s) for s in steps]
    exports = [s for s in adapted if s.startswith("export ")]
    at = {s.split()[0] + " " + s.split()[1]: i for i, s in enumerate(adapted)}
    log = temp / "steps.log"
    try:
        # Up to and including `serve status`: the app runs.
        run_steps(adapted[:at["serve shutdown"]], env, REPO, log)
        assert (home / ".ray" / "auth_token").is_file()  # made by the documented step, in the fresh HOME
        env["RAY_AUTH_MODE"] = "token"
        x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        resp = requests.post(f"http://127.0.0.1:{http_port}/v2/models/resnet18/infer", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["shape"] == [1, 1000]
        assert coordinator_alive(env, f"127.0.0.1:{port}", namespace)

        # `serve shutdown`: the app goes, and its coordinator with it.
        run_steps(exports + [adapted[at["serve shutdown"]]], env, REPO, log)
        wait_for(lambda: not coordinator_alive(env, f"127.0.0.1:{port}", namespace), 90,
                 "the coordinator actor to exit after serve shutdown", interval_s=2.0)

        # `ray stop`.
        if ray_stop_verbatim:
            run_steps(exports + adapted[at["ray stop"]:], env, REPO, log)
            assert not _processes_under(str(temp / "ray"))
    except BaseException:
        print(log.read_text()[-6000:] if log.exists() else "(no log)")
        raise
    finally:
        _stop_processes(_processes_under(str(temp)))
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - for running the steps by hand
    sys.exit(pytest.main([__file__, "-s"]))
