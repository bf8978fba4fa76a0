"""Is ``aecho bench`` fast enough not to be what limits a measurement?

Drives one echo server with the compiled epoll load generator (benchmarks/loadgen.c) and
with one ``aecho bench`` process, alternating, 500 connections of 64-byte ping-pong by
default, and prints the ratio of their median messages/s.  The target is bench >= 60 % of
loadgen.  Two servers, one after the other: ``aecho serve`` (uvloop, inline echo) and
benchmarks/echo_epoll.c, a C epoll echo server that leaves the load generator as the
bottleneck.

    .venv/bin/python benchmarks/bench_speed.py [--server both|aecho|c] [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import (
    aecho_serve,
    build_c,
    cpu_seconds,
    loadgen_path,
    median,
    run_loadgen,
    server_process,
    settle,
)


def run_bench(port: int, connections: int, size: int, duration: float, warmup: float) -> float:
    cmd = [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port)]
    cmd += ["-c", str(connections), "-s", str(size), "-d", str(duration)]
    cmd += ["--warmup", str(warmup), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    if not out.stdout:
        raise RuntimeError(f"aecho bench failed: {out.stderr.strip()}")
    data = json.loads(out.stdout)
    if data["errors"] or data["mismatches"]:
        raise RuntimeError(f"aecho bench saw errors: {data['errors_by_kind']}")
    return float(data["msgs_per_s"])


def echo_epoll_path() -> Path:
    """The compiled minimal C epoll echo server (benchmarks/echo_epoll.c)."""
    return build_c("echo_epoll")


def compare(argv: list[str], args: argparse.Namespace) -> float:
    """Alternate loadgen and aecho bench against one server; return the median ratio."""
    c_rates: list[float] = []
    py_rates: list[float] = []
    head = ("round", "loadgen msgs/s", "srv cpu", "bench msgs/s", "srv cpu")
    print("{:>5}  {:>15}  {:>7}  {:>13}  {:>7}".format(*head))
    with server_process(argv) as (proc, port):
        for i in range(args.rounds):
            row = []
            for which in ("loadgen", "bench"):
                settle()
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                if which == "loadgen":
                    r = run_loadgen(
                        port, args.connections, args.size, args.duration, warmup=args.warmup
                    )
                    if r.get("errors") or r.get("mismatches"):
                        raise RuntimeError(f"loadgen saw errors: {r}")
                    rate = float(r["msgs_per_s"])
                    c_rates.append(rate)
                else:
                    rate = run_bench(port, args.connections, args.size, args.duration, args.warmup)
                    py_rates.append(rate)
                # The server's CPU share (of one core) shows which side was the bottleneck.
                busy = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
                row += [rate, busy]
            print(f"{i + 1:>5}  {row[0]:>15,.0f}  {row[1]:>6.0%}  {row[2]:>13,.0f}  {row[3]:>6.0%}")
    ratio = median(py_rates) / median(c_rates)
    print(
        f"median: loadgen {median(c_rates):,.0f} msgs/s, aecho bench {median(py_rates):,.0f} "
        f"msgs/s, ratio {ratio:.0%} (target >= 60%)\n"
    )
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", choices=["both", "aecho", "c"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("-c", "--connections", type=int, default=500)
    ap.add_argument("-s", "--size", type=int, default=64)
    args = ap.parse_args()
    loadgen_path()  # compile before anything is timed
    servers = {"aecho": aecho_serve(), "c": [str(echo_epoll_path())]}
    chosen = list(servers) if args.server == "both" else [args.server]
    print(f"{args.connections} connections, {args.size} B ping-pong, {args.duration:g} s per run")
    ratios = []
    for name in chosen:
        print(f"\nserver: {'aecho serve (uvloop)' if name == 'aecho' else 'echo_epoll.c'}")
        ratios.append(compare(servers[name], args))
    return 0 if min(ratios) >= 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
