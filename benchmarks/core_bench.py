"""Core server benchmark: ``aecho serve`` side by side with two minimal reference echo servers.

    .venv/bin/python benchmarks/core_bench.py [--reps 5] [--duration 5] [--json out.json]

Each server runs in its own subprocess pinned to CPU 0; the C load generator
(benchmarks/loadgen.c) runs pinned to CPU 1.  For every repetition and every load the
servers take turns (A, B, C, A, B, C, ...), each freshly started, so slow drifts in the
machine's background load hit all of them alike.  The table shows medians over the
repetitions; ratios are of those medians, with the range of the paired per-repetition
ratios beside them as the noise estimate.

Evidence that the load generator is not the bottleneck, printed for every cell: the
server's CPU use (user+sys over the load generator's lifetime; ~100% = its core is
saturated) against the load generator's own.  ``--split-check`` adds a run where two load
generators share the connections: if the figure does not rise, one was enough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HERE,
    aecho_serve,
    cpu_busy_pct,
    cpu_seconds,
    cpu_times,
    loadgen_cmd,
    median,
    pinned,
    run_loadgen,
    server_process,
    settle,
)

SERVER_CPU = 0
LOADGEN_CPU = 1


@dataclass(frozen=True)
class Load:
    name: str
    connections: int
    size: int


LOADS = {
    "64B": Load("64 B", 500, 64),
    "1KiB": Load("1 KiB", 500, 1024),
    "64KiB": Load("64 KiB", 50, 64 * 1024),
}

SERVERS: dict[str, list[str]] = {
    # Default options: uvloop, raw framing, inline echo.
    "aecho": aecho_serve(),
    "uvloop-ref": [sys.executable, str(HERE / "ref_uvloop.py")],
    "streams-ref": [sys.executable, str(HERE / "ref_streams.py")],
    "streams-uvloop": [sys.executable, str(HERE / "ref_streams.py"), "--loop", "uvloop"],
    # Not in the default run: the plain-Protocol shape of the uvloop reference.
    "uvloop-plain-ref": [sys.executable, str(HERE / "ref_uvloop.py"), "--plain"],
}
DEFAULT_SERVERS = ["aecho", "uvloop-ref", "streams-ref", "streams-uvloop"]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(server: str, load: Load, duration: float, warmup: float) -> dict[str, Any]:
    """One cell: a fresh server on CPU 0, one load generator run on CPU 1."""
    with server_process(pinned(SERVERS[server], SERVER_CPU)) as (proc, port):
        cpu0 = cpu_seconds(proc.pid)
        t0 = cpu_times()
        res = run_loadgen(port, load.connections, load.size, duration, warmup, cpu=LOADGEN_CPU)
        busy = cpu_busy_pct(t0, cpu_times())
        server_cpu = cpu_seconds(proc.pid) - cpu0
    res["server_cpu_pct"] = 100.0 * server_cpu / res["wall_s"]
    res["loadgen_cpu_pct"] = 100.0 * res["loadgen_cpu_s"] / res["wall_s"]
    res["cpu0_busy_pct"], res["cpu0_steal_pct"] = busy[SERVER_CPU]
    res["cpu1_busy_pct"], res["cpu1_steal_pct"] = busy[LOADGEN_CPU]
    # CPU that neither process accounts for: other tenants' work plus our unattributed
    # softirq time.  High values mark a noisy run.
    res["foreign_cpu_pct"] = (
        res["cpu0_busy_pct"] + res["cpu1_busy_pct"] - res["server_cpu_pct"] - res["loadgen_cpu_pct"]
    )
    # CPU cost per echoed message over each process's whole run.  Unlike msgs/s this
    # hardly moves when other work steals the CPUs, so it is the steadier comparison.
    served = max(res["msgs_per_s"] * res["wall_s"], 1.0)
    res["server_us_per_msg"] = 1e6 * server_cpu / served
    res["loadgen_us_per_msg"] = 1e6 * res["loadgen_cpu_s"] / served
    res["loadavg"] = loadavg()
    if res["errors"] or res["mismatches"]:
        print(f"  !! {server} {load.name}: {res['errors']} errors, {res['mismatches']} mismatches")
    return res


def split_run(server: str, load: Load, duration: float, warmup: float, parts: int) -> float:
    """Total msgs/s when ``parts`` load generators (all on CPU 1) share the connections."""
    with server_process(pinned(SERVERS[server], SERVER_CPU)) as (_proc, port):
        each = load.connections // parts
        cmds = [loadgen_cmd(port, each, load.size, duration, warmup, cpu=LOADGEN_CPU)] * parts
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE) for c in cmds]
        outs = [p.communicate(timeout=duration + warmup + 60)[0] for p in procs]
    return sum(float(json.loads(o)["msgs_per_s"]) for o in outs)


def progress(res: dict[str, Any]) -> str:
    p50 = res["latency_us"]["p50"]
    return (
        f"{res['msgs_per_s']:>10,.0f} msgs/s  p50 {p50:>7,.0f} µs  "
        f"server {res['server_cpu_pct']:3.0f}% {res['server_us_per_msg']:5.1f} µs/msg  "
        f"loadgen {res['loadgen_cpu_pct']:3.0f}% {res['loadgen_us_per_msg']:5.1f} µs/msg  "
        f"others {res['foreign_cpu_pct']:3.0f}%"
    )


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def ratio_table(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    servers: list[str],
    field: str,
    invert: bool,
) -> None:
    others = [s for s in servers if s != "aecho"]
    print("| load | " + " | ".join(f"aecho vs {s}" for s in others) + " |")
    print("|---|" + "--:|" * len(others))
    for key, by_server in results.items():
        if "aecho" not in by_server:
            continue
        a = [r[field] for r in by_server["aecho"]]
        cells = []
        for s in others:
            b = [r[field] for r in by_server[s]]
            paired = [(y / x if invert else x / y) for x, y in zip(a, b, strict=True)]
            ratio = median(b) / median(a) if invert else median(a) / median(b)
            cells.append(f"{ratio:.2f}x ({spread(paired)})")
        load = LOADS[key]
        print(f"| {load.connections} x {load.name} | " + " | ".join(cells) + " |")


def report(results: dict[str, dict[str, list[dict[str, Any]]]], servers: list[str]) -> None:
    print("\n## Medians\n")
    print(
        "| load | server | msgs/s | MiB/s | p50 µs | p99 µs | msgs/s min-max "
        "| server CPU, µs/msg | loadgen CPU, µs/msg | others' CPU |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for key, by_server in results.items():
        load = LOADS[key]
        for server in servers:
            runs = by_server[server]

            def med(f: str, runs: list[dict[str, Any]] = runs) -> float:
                return median([r[f] for r in runs])

            rates = [r["msgs_per_s"] for r in runs]
            print(
                f"| {load.connections} x {load.name} | {server} | {med('msgs_per_s'):,.0f} "
                f"| {med('mib_per_s'):,.1f} "
                f"| {median([r['latency_us']['p50'] for r in runs]):,.0f} "
                f"| {median([r['latency_us']['p99'] for r in runs]):,.0f} "
                f"| {min(rates):,.0f}-{max(rates):,.0f} "
                f"| {med('server_cpu_pct'):.0f}%, {med('server_us_per_msg'):.1f} "
                f"| {med('loadgen_cpu_pct'):.0f}%, {med('loadgen_us_per_msg'):.1f} "
                f"| {med('foreign_cpu_pct'):.0f}% |"
            )
    print("\n## aecho msgs/s / reference msgs/s: ratio of medians (paired per-rep range)\n")
    ratio_table(results, servers, "msgs_per_s", invert=False)
    print("\n## reference server CPU per message / aecho's (>1: aecho is cheaper)\n")
    ratio_table(results, servers, "server_us_per_msg", invert=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="aecho vs reference echo servers")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--servers", default=",".join(DEFAULT_SERVERS), help=f"of {', '.join(SERVERS)}"
    )
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated")
    parser.add_argument("--split-check", action="store_true", help="also run 1 vs 2 loadgens")
    parser.add_argument("--json", type=Path, help="write every run's raw result here")
    args = parser.parse_args()
    servers = args.servers.split(",")
    loads = args.loads.split(",")
    if unknown := [s for s in servers if s not in SERVERS] + [x for x in loads if x not in LOADS]:
        print(f"core_bench: unknown server or load: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("core_bench: needs two CPUs (server on 0, load generator on 1)", file=sys.stderr)
        return 2

    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        k: {s: [] for s in servers} for k in loads
    }
    started = time.monotonic()
    for rep in range(1, args.reps + 1):
        for key in loads:
            for server in servers:
                res = measure(server, LOADS[key], args.duration, args.warmup)
                results[key][server].append(res)
                print(f"rep {rep} {key:>5} {server:<14} {progress(res)}", flush=True)
                settle()
    report(results, servers)

    if args.split_check:
        print("\n## One load generator vs two (both on CPU 1), 500 x 64 B, msgs/s\n")
        print("| server | 1 loadgen | 2 loadgens |")
        print("|---|--:|--:|")
        for server in [s for s in ("aecho", "uvloop-ref") if s in servers]:
            one, two = [], []
            for _ in range(args.reps):
                one.append(split_run(server, LOADS["64B"], args.duration, args.warmup, 1))
                settle()
                two.append(split_run(server, LOADS["64B"], args.duration, args.warmup, 2))
                settle()
            print(f"| {server} | {median(one):,.0f} | {median(two):,.0f} |")

    print(f"\n(total {time.monotonic() - started:.0f} s; loadavg now {loadavg():.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
