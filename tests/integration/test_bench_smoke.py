"""Every benchmark in scripts/ runs in its tiny CPU configuration, so none of them rots.

Smoke runs only: they check that each script runs end to end, prints its table and
writes its plot. They make no timing claims (the figures are in docs/benchmarks.md,
measured on the GPU machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (script, arguments, plot it must write, text its final table must contain)
BENCHES = [
    ("bench_modes.py", ["--quick", "--models", "resnet18-b2"], "modes.png", "| ---"),
    ("bench_pressure.py", ["--quick"], "bench_pressure.png", "| ---"),
    ("bench_pressure.py", ["--scenario", "mixed", "--quick"], "bench_pressure_mixed.png", "| ---"),
    ("bench_density.py", ["--quick"], "bench_density.png", "| ---"),
    ("bench_density.py", ["--quick", "--system", "ebb-groups", "--group-serve"], "bench_density.png",
     "ebb-groups targets"),
    ("bench_admission.py", ["--quick"], "admission.png", "p50 µs"),
    ("bench_pool.py", ["--quick"], "bench_pool_quick.png", "| -"),
    ("bench_pool.py", ["--cpu-path", "--iterations", "50", "--warmup", "5", "--cpu-chunks", "1,4"], None,
     "CUDA faked (no GPU figure)"),
    ("bench_remap.py", ["--quick"], None, "smoke run only"),
    ("bench_serving.py", ["--quick"], "bench_serving_smoke.png", "smoke run only"),
]


@pytest.mark.parametrize("script, args, plot, table", BENCHES, ids=[" ".join([b[0], *b[1]]) for b in BENCHES])
def test_benchmark_smoke(script: str, args: list[str], plot: str | None, table: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert table in proc.stdout, f"{script} printed no table:\n{proc.stdout[-2000:]}"
    if plot is not None:
        assert (tmp_path / plot).is_file(), f"{script} wrote no {plot}: {sorted(p.name for p in tmp_path.iterdir())}"
