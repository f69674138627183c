"""Per-process CPU use while a benchmark runs: which Serve process saturates first.

    python3 scripts/cpu_sampler.py --out top.json [--interval 1] &   # then kill -TERM it

Reads /proc directly (no psutil), once per interval, for the processes whose command line
names a Serve actor (proxy, replicas, controller), the raylet or perf_analyzer. On
SIGTERM it writes every sample to --out and prints, per process, the mean and the peak
CPU share (100% = one core busy) over the samples where it was busy at all. A process at
~100% while the client's rate flattens is the one that sets the rate: Python's GIL keeps
a replica on one core however many threads it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

PATTERNS = ("ServeReplica", "ProxyActor", "ServeController", "raylet", "perf_analyzer", "gcs_server")
_TICKS = os.sysconf("SC_CLK_TCK")


def _name(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    for pattern in PATTERNS:
        if pattern in cmd:
            # Ray titles its workers "ray::ServeReplica:app:Deployment": keep that word.
            word = next((w for w in cmd.split() if pattern in w), pattern)
            return f"{word[:60]} [{pid}]"
    return None


def _cpu_ticks(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of stat)


def _snapshot() -> dict[str, tuple[str, int]]:
    seen = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        name = _name(pid)
        ticks = _cpu_ticks(pid) if name else None
        if name and ticks is not None:
            seen[pid] = (name, ticks)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    samples: list[dict] = []
    before, t0 = _snapshot(), time.monotonic()
    while not stop:
        time.sleep(args.interval)
        now, t1 = _snapshot(), time.monotonic()
        shares = {
            name: round(100.0 * (ticks - before[pid][1]) / _TICKS / (t1 - t0), 1)
            for pid, (name, ticks) in now.items()
            if pid in before
        }
        samples.append({"t": round(time.time(), 2), "cpu_pct": shares})
        before, t0 = now, t1
    with open(args.out, "w") as f:
        json.dump(samples, f)
    per: dict[str, list[float]] = {}
    for sample in samples:
        for name, pct in sample["cpu_pct"].items():
            if pct >= 5.0:
                per.setdefault(name, []).append(pct)
    print(f"| process | busy samples | mean CPU % | peak CPU % |  ({len(samples)} samples)")
    print("| --- | --- | --- | --- |")
    for name, pcts in sorted(per.items(), key=lambda kv: -max(kv[1])):
        print(f"| {name} | {len(pcts)} | {sum(pcts) / len(pcts):.0f} | {max(pcts):.0f} |")


if __name__ == "__main__":
    main()
