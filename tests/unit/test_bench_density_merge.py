"""bench_density --merge: one side-by-side table from one system per command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_density  # noqa: E402

ARGS = {"card_gib": 6.0, "arch": "resnet50", "batch": 32, "rate_per_replica": 2.0, "system": "plain"}


def _run(tmp_path: Path, name: str, card: str, results: dict, groups=None, cut=False, **args) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"card": card, "args": {**ARGS, **args}, "cut_short": cut, "results": results,
                                "ebb-groups": groups, "ebb-groups-serve": None}))
    return str(path)


def _rows(n_held: int, why: str) -> list[dict]:
    rows = [{"replicas": i, "held": True, "why": "", "p50_ms": 20.0, "p99_ms": 25.0} for i in range(1, n_held + 1)]
    return rows + [{"replicas": n_held + 1, "held": False, "why": why}]


def test_merge_puts_the_systems_side_by_side(tmp_path, capsys):
    a = _run(tmp_path, "plain", "NVIDIA H200", {"plain": _rows(3, "4th: out of memory")})
    b = _run(tmp_path, "ebb", "NVIDIA H200", {"ebb": _rows(7, "8th: deploy failed")}, system="ebb")
    assert bench_density.merge([a, b], tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "| plain | 3 | 4th: out of memory |" in printed
    assert "| ebb | 7 | 8th: deploy failed |" in printed
    assert "| ratio ebb / plain | 2.33x |" in printed
    merged = json.loads((tmp_path / "out" / "bench_density.json").read_text())
    assert set(merged["results"]) == {"plain", "ebb"} and merged["cut_short"] is False


def test_merge_refuses_runs_that_are_not_comparable(tmp_path):
    a = _run(tmp_path, "a", "NVIDIA H200", {"plain": _rows(3, "x")})
    other_card = _run(tmp_path, "b", "NVIDIA H100 80GB HBM3", {"ebb": _rows(5, "y")})
    other_size = _run(tmp_path, "c", "NVIDIA H200", {"ebb": _rows(5, "y")}, card_gib=12.0)
    twice = _run(tmp_path, "d", "NVIDIA H200", {"plain": _rows(2, "z")})
    for other in (other_card, other_size):
        with pytest.raises(SystemExit, match="different cards or settings"):
            bench_density.merge([a, other], tmp_path / "out")
    with pytest.raises(SystemExit, match="'plain' is in two"):
        bench_density.merge([a, twice], tmp_path / "out")


def test_a_cut_run_says_so_instead_of_max_tried(tmp_path, capsys):
    a = _run(tmp_path, "a", "NVIDIA H200", {"ebb": [{"replicas": 1, "held": True, "why": "", "p50_ms": 1.0,
                                                   "p99_ms": 1.0}]}, cut=True, system="ebb")
    bench_density.merge([a], tmp_path / "out")
    assert "| ebb | 1 | cut short (SIGTERM) |" in capsys.readouterr().out
