"""bench_serving's output: the tables (targets met / not met) and the plot, from the
results dict ``bench_serving.main`` builds. Kept apart so that a results JSON can be
reprinted without running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import serving_path
from benchlib import markdown_table

#: The issue's targets: perf_analyzer over HTTP binary and gRPC at this concurrency
#: reaches this share of the in-process engine's requests/s; a small request's p99 with
#: large JSON bodies in flight is at most this multiple of its p99 alone.
TARGET_CONCURRENCY = 16
TARGET_SHARE = 0.80
TARGET_P99_RATIO = 2.0


# -- output --------------------------------------------------------------------------------


def tables(results: dict[str, Any]) -> str:
    ceiling = results["ceiling"]["requests_per_s"]
    rows = []
    for protocol, by_c in results["protocols"].items():
        for c, r in sorted(by_c.items(), key=lambda kv: int(kv[0])):
            if "error" in r and "requests_per_s" not in r:
                rows.append([protocol, c, "failed", "", "", "", r["error"][:80]])
                continue
            rows.append([protocol, c, f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                         f"{r['requests_per_s'] / ceiling:.0%}", r.get("error", "")[:80]])
    out = [(f"Driver: {results['driver']}; model {results['model']} batch {results['batch']}; in-process engine "
            f"(ceiling) {ceiling:.1f} requests/s, p50 {results['ceiling']['p50_ms']:.2f} ms"),
           markdown_table(["protocol", "concurrency", "requests/s", "p50 ms", "p99 ms", "of ceiling", "note"], rows)]
    stage_rows = [[protocol, c, stage, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}"]
                  for protocol, by_c in results["protocols"].items() for c, r in by_c.items()
                  for stage, v in (r.get("replica_path") or {}).items() if isinstance(v, dict)]
    if stage_rows:
        out.append("In the model replica, per row (deployments.call_path):\n" + markdown_table(
            ["protocol", "concurrency", "stage", "p50 ms", "p99 ms"], stage_rows))
    if results.get("call_path"):
        out.append("One caller straight to the model deployment (no ingress, no proxy):\n" + markdown_table(
            ["call", "p50 ms", "p99 ms"], serving_path.table_rows(results["call_path"])))
    s = results["small_behind_large"]
    if s is not None:
        out.append(markdown_table(
            ["small request (JSON)", "p50 ms", "p99 ms"],
            [["alone", f"{s['alone_p50_ms']:.1f}", f"{s['alone_p99_ms']:.1f}"],
             [f"with {s['large_senders']} client processes sending {s['large_body_mib']} MiB JSON "
              f"({s['large_bodies_sent']} answered{_sender_trouble(s)})",
              f"{s['loaded_p50_ms']:.1f}", f"{s['loaded_p99_ms']:.1f}"]]))
    if results.get("serve_env"):
        out.append(f"Cluster environment: {results['serve_env']}")
    out.append(markdown_table(["target", "figure", "met"], target_rows(results)))
    if not results["claims"]:
        out.append("smoke run only (no perf_analyzer, CPU): no claims")
    return "\n\n".join(out)


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    ceiling = results["ceiling"]["requests_per_s"]
    rows = []

    def verdict(ok: bool) -> str:
        return ("met" if ok else "not met") if results["claims"] else "smoke (no claim)"

    for protocol in ("http-binary", "grpc"):
        r = results["protocols"].get(protocol, {}).get(str(TARGET_CONCURRENCY))
        share = r["requests_per_s"] / ceiling if r and "requests_per_s" in r else None
        rows.append([f"{protocol} at concurrency {TARGET_CONCURRENCY} >= {TARGET_SHARE:.0%} of the engine",
                     "n/a" if share is None else f"{share:.0%}",
                     "n/a" if share is None else verdict(share >= TARGET_SHARE)])
    s = results["small_behind_large"]
    if s is None:
        return rows
    ratio = s["loaded_p99_ms"] / s["alone_p99_ms"]
    trouble = _sender_trouble(s)
    rows.append([f"small p99 with large bodies <= {TARGET_P99_RATIO:g}x alone", f"{ratio:.2f}x{trouble}",
                 "n/a (large senders failed)" if trouble and results["claims"] else verdict(ratio <= TARGET_P99_RATIO)])
    return rows


def _sender_trouble(s: dict[str, Any]) -> str:
    """"", or what went wrong with the large senders: the small request then did not
    wait behind what the figure says."""
    parts = [f"{n} answered {k}" for k, n in s.get("large_non_200", {}).items()]
    parts += s.get("sender_errors", [])
    if not parts and s.get("large_bodies_sent", 0) == 0:
        parts = ["no large body answered"]
    return "; " + "; ".join(parts)[:200] if parts else ""


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4))
    for protocol, by_c in results["protocols"].items():
        points = sorted((int(c), r) for c, r in by_c.items() if "requests_per_s" in r)
        if not points:
            continue
        cs = [c for c, _ in points]
        ax_rps.plot(cs, [r["requests_per_s"] for _, r in points], marker="o", label=protocol)
        ax_p99.plot(cs, [r["p99_ms"] for _, r in points], marker="o", label=protocol)
    ax_rps.axhline(results["ceiling"]["requests_per_s"], color="k", linestyle="--", label="in-process engine")
    for ax, label in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Ebb serving path: {results['model']} batch {results['batch']} ({results['driver']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
