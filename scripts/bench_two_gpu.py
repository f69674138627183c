"""Two GPUs of one host: another process fills only the second card; per card, the
replicas, their modes over time (sampled from /ebb/status) and the failed requests.

    python scripts/bench_two_gpu.py              # two real cards (nvidia-h200-x2)
    python scripts/bench_two_gpu.py --logical    # CPU: two logical GPUs, pressure injected on the second

The scenario (placement at num_gpus 0.5, the ballast, traffic, sampling) is
``scripts/two_gpu_scenario.py``, the same one ``tests/gpu/test_two_gpu.py`` asserts
on. This script asserts nothing: it prints a table per card and lists what the
scenario's checks found, writes JSON and a plot (default docs/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import two_gpu_scenario as scenario  # noqa: E402


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(result: dict) -> str:
    """The per-card table and the run's figures, as markdown."""
    cfg = result["config"]
    where = "two logical GPUs (CPU)" if cfg["logical"] else f"two cards ({result.get('ballast_device')})"
    on, off = result["t_pressure_on_s"], result["t_pressure_off_s"]

    def after(mode, since):
        t = scenario.first_sample_all(result, result["pressed"], mode, since)
        return "not reached" if t is None else f"{(t - since) * 1e3:.0f} ms (sampled every {cfg['sample_period_s']:g} s)"

    lines = [
        (f"Two-GPU run on {where}: {cfg['replicas_per_model']} replicas each of resnet18 and bert-tiny at "
         f"num_gpus {cfg['num_gpus']}, context pool on; pressure on {result['pressed']} in steps "
         f"{', '.join(f'{s:.0%}' for s in cfg['fill_steps'])} "
         f"({'coordinator injection' if cfg['logical'] else 'a separate process, torch.empty on that card only'}), "
         f"full from {on:.1f} s, freed at {off:.1f} s."),
        "",
        markdown_table(["card", "replicas", "modes over time (sampled from /ebb/status)", "peak use",
                        "failed requests (models on it)"], scenario.card_rows(result)),
        "",
        markdown_table(["metric", "value"], [
            ["second card: pressure full -> all its replicas dynamic", after("dynamic", on)],
            [f"second card: pressure gone -> all static (dwell {cfg['min_dwell_s']:g} s)",
             after("static", off)],
            ["decisions on the first card", sum(1 for h in result["history"] if h["gpu"] == result["cards"][0])],
            *[[f"{m}: requests sent / failed / p50 / p99", (f"{t['sent']} / {t['failed']} / "
               f"{t['p50_ms'] or float('nan'):.1f} ms / {t['p99_ms'] or float('nan'):.1f} ms")]
              for m, t in result["traffic"].items()],
            ["failed requests, all models", sum(t["failed"] for t in result["traffic"].values())],
            ["status samples (missed)", f"{len(result['samples'])} ({result['sample_errors']})"],
        ]),
    ]
    problems = scenario.problems(result)
    lines += ["", "checks of tests/gpu/test_two_gpu.py: " + ("all hold" if not problems else "FAILED")]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cards = result["cards"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True, squeeze=False)
    for col, uuid in enumerate(cards):
        ax = axes[0][col]
        pts = [(s["t"], s["gpus"][uuid]["used_bytes"] / s["gpus"][uuid]["total_bytes"]) for s in result["samples"]
               if uuid in s["gpus"] and s["gpus"][uuid]["total_bytes"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label="in use (coordinator)")
        nv = [(s["t"], s["nvml_used_bytes"][uuid]) for s in result["samples"] if uuid in s.get("nvml_used_bytes", {})]
        if nv and pts:
            total = next(s["gpus"][uuid]["total_bytes"] for s in result["samples"] if uuid in s["gpus"])
            ax.plot([p[0] for p in nv], [p[1] / total for p in nv], linestyle=":", label="NVML used")
        for share, style in ((0.90, "--"), (0.75, ":")):
            ax.axhline(share, color="grey", linestyle=style, linewidth=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("share of card")
        ax.set_title(f"{uuid[:28]}{' (pressed)' if uuid == result['pressed'] else ''}", fontsize=9)
        ax.legend(loc="center left", fontsize=7)
        ax = axes[1][col]
        for i, rid in enumerate(sorted(scenario.mode_segments(result["samples"], uuid))):
            model = next((s["gpus"][uuid]["replicas"][rid]["model"] for s in result["samples"]
                          if rid in s["gpus"].get(uuid, {}).get("replicas", {})), "?")
            ts, ys = [], []
            for s in result["samples"]:
                r = s["gpus"].get(uuid, {}).get("replicas", {}).get(rid)
                if r:
                    ts.append(s["t"])
                    ys.append((1 if r["mode"] == "dynamic" else 0) + 0.04 * i)
            ax.step(ts, ys, where="post", label=f"{model}:{rid[-6:]}")
        ax.set_yticks([0, 1], ["static", "dynamic"])
        ax.set_ylim(-0.2, 1.3)
        ax.set_xlabel("seconds")
        ax.legend(loc="center left", fontsize=7)
        for a in (axes[0][col], axes[1][col]):
            a.axvline(result["t_pressure_on_s"], color="red", linewidth=0.8)
            a.axvline(result["t_pressure_off_s"], color="green", linewidth=0.8)
    failed = sum(t["failed"] for t in result["traffic"].values())
    fig.suptitle(f"Pressure on the second card only ({'logical GPUs' if result['config']['logical'] else 'real cards'}"
                 f"): {scenario.calls_sent(result)} requests, {failed} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logical", action="store_true",
                   help="two logical GPUs on the CPU, pressure injected on the second (CI smoke)")
    p.add_argument("--hold-s", type=float, default=None, help="how long the pressure is held once full")
    p.add_argument("--out-dir", default=str(scenario.ROOT / "docs" / "results"))
    p.add_argument("--name", default=None, help="file stem (default two-gpu-logical / two-gpu-h200x2)")
    args = p.parse_args(argv)
    overrides = {} if args.hold_s is None else {"hold_s": args.hold_s}
    cfg = scenario.ScenarioConfig.logical_cpu(**overrides) if args.logical else scenario.ScenarioConfig.gpu(**overrides)
    if not args.logical:
        import torch

        if torch.cuda.device_count() < 2:
            print(f"needs two CUDA devices, this host has {torch.cuda.device_count()}; "
                  f"use --logical on a host without them", file=sys.stderr)
            return 2
    result = scenario.run(cfg, strict=False)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("two-gpu-logical" if args.logical else "two-gpu-h200x2")
    text = report(result)
    (out_dir / f"{stem}.json").write_text(json.dumps({**result, "report": text}, separators=(",", ":"), default=str))
    plot(out_dir / f"{stem}.png", result)
    print(text)
    print(f"\nwrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
