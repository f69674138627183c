"""The ``ebb`` console command: ``ebb status`` and ``ebb build``.

``ebb status`` prints, per GPU, its memory and pressure and under it each replica
with mode, bytes held, request rate, last decision and its process's measured floor;
under a group replica, each of its models with weights tier, bytes, last use and
page-ins; ``--watch`` refreshes,
``--json`` prints the raw view for scripts. It reads the ingress's ``/ebb/status``
(the same JSON over HTTP), or the coordinator actor directly with ``--ray-address``.
``ebb build`` turns an ONNX file or an architecture into a cached engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from engine_runtime.units import MiB


def fetch_status(url: str | None, ray_address: str | None, namespace: str) -> dict:
    if ray_address is not None:
        import ray

        from deployments.coordinator import get_existing

        if not ray.is_initialized():
            ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
        return ray.get(get_existing(namespace).status.remote(), timeout=10)
    with urllib.request.urlopen(url.rstrip("/") + "/ebb/status", timeout=10) as r:
        return json.loads(r.read())


def _ago(t: float | None, now_s: float) -> str:
    return "never" if t is None else f"{max(0.0, now_s - t):,.0f} s ago"


def _replica_details(r: dict, now_s: float) -> list[str]:
    """The floor (where measured) and, for a group replica, one line per model."""
    lines = []
    if r.get("floor_bytes") is not None:
        lines.append(f"    process floor {r['floor_bytes'] / MiB:,.0f} MiB")
    pool = r.get("pool")
    if pool and not pool.startswith("not used"):
        # Shown where asked for: a pool that was configured but is unavailable here (no
        # CUDA, no VMM) is otherwise visible only as the mechanism the replica fell back to.
        lines.append(f"    context pool: {pool}")
    models = r.get("models")
    if models:
        pending = set(r.get("page_out_pending") or ())
        lines.append(f"    group {r.get('group') or r['model']}: {len(models)} models, weights on the GPU "
                     f"{r['weights_bytes'] / MiB:,.1f} MiB")
        lines.append(f"    {'model':<18}{'tier':<10}{'weights MiB':>12}{'last use':>14}{'page-ins':>10}"
                     f"{'page-in ms':>12}{'calls':>8}")
        for m in models:
            mean_ms = m["page_in_seconds_total"] / m["page_ins"] * 1e3 if m["page_ins"] else 0.0
            tier = m["tier"] + ("*" if m["name"] in pending else "")
            lines.append(f"    {m['name']:<18}{tier:<10}{m['weights_bytes'] / MiB:>12.1f}"
                         f"{_ago(m.get('last_used_s'), now_s):>14}{m['page_ins']:>10}{mean_ms:>12.2f}"
                         f"{m['calls']:>8}")
        if pending:
            lines.append("    * the coordinator asked for a page-out (under pressure)")
    return lines


def render(status: dict) -> str:
    lines = []
    for gpu in status.get("gpus", []):
        pressure = "unknown" if gpu.get("pressure") is None else f"{gpu['pressure']:.1%}"
        kind = "virtual" if gpu.get("virtual") else "gpu"
        budget = "unset" if gpu.get("budget_bytes") is None else f"{gpu['budget_bytes'] / MiB:,.0f} MiB"
        lines.append(f"{kind} {gpu['gpu']}  used {gpu['used_bytes'] / MiB:,.0f} / {gpu['total_bytes'] / MiB:,.0f} MiB"
                     f"  pressure {pressure}  budget {budget}"
                     + (f"  external {gpu['external_bytes'] / MiB:,.0f} MiB" if gpu.get("external_bytes") else ""))
        lines.append(f"  {'model':<14}{'replica':<12}{'mode':<9}{'mechanism':<17}{'held MiB':>9}{'ctx MiB':>9}"
                     f"{'req/s':>8}  last decision")
        for r in gpu.get("replicas", []):
            mode = r["mode"] if r["mode"] == r.get("desired_mode", r["mode"]) else f"{r['mode']}>{r['desired_mode']}"
            lines.append(f"  {r['model']:<14}{r['replica_id']:<12}{mode:<9}{r['mechanism']:<17}"
                         f"{r['held_bytes'] / MiB:>9.1f}{r['context_bytes'] / MiB:>9.1f}"
                         f"{r['request_rate_per_s']:>8.2f}  {(r.get('last_decision') or '-')[:100]}")
            lines.extend(_replica_details(r, now_s=time.time()))
    if not status.get("gpus"):
        lines.append("no replicas have reported yet")
    history = status.get("history", [])
    if history:
        lines.append(f"last decisions ({len(history)} kept):")
        for h in history[-5:]:
            what = f"page out {', '.join(h['page_out'])}" if h.get("page_out") else f"-> {h['new_mode']}"
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(h['time_s']))} {h['model']} "
                         f"{h['replica_id']} {what}: {h['reason'][:120]}")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    while True:
        try:
            status = fetch_status(args.url, args.ray_address, args.namespace)
        except (urllib.error.URLError, OSError, ValueError) as err:
            where = (f"the coordinator through Ray at {args.ray_address}" if args.ray_address is not None
                     else f"{args.url.rstrip('/')}/ebb/status")
            print(f"ebb status: cannot read the status from {where} ({err}); is the application running "
                  f"there? --url names its HTTP address, --ray-address auto reads the coordinator instead",
                  file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(status, indent=2, default=str))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render(status))
        if not args.watch:
            return 0
        time.sleep(args.interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebb", description="Ebb: serve many models on shared GPUs")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="per GPU memory and pressure, per replica mode and bytes")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="the Ebb application's HTTP address")
    st.add_argument("--ray-address", default=None, help="read the coordinator actor through Ray instead (e.g. auto)")
    st.add_argument("--namespace", default="ebb", help="the coordinator's Ray namespace")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval-s", type=float, default=1.0, help="refresh period with --watch")
    st.add_argument("--json", action="store_true", help="print the raw JSON view")
    sub.add_parser("build", help="build an ONNX file or architecture into a cached engine", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "build":
        from engine_runtime.build import main as build_main

        return build_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _status(args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
