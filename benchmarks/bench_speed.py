"""Is ``aecho bench`` fast enough not to be what limits a measurement?

Drives one echo server with the compiled epoll load generator (benchmarks/loadgen.c) and
with one ``aecho bench`` process (one worker, every byte verified, every latency in its
histogram), alternating, 500 connections of 64-byte ping-pong by default, and prints the
ratio of their median messages/s and each side's CPU time per message.  The target is
bench >= 90 % of loadgen against benchmarks/echo_epoll.c, a minimal C epoll echo server
(``--server aecho`` measures against ``aecho serve`` instead, ``both`` against each).

    .venv/bin/python benchmarks/bench_speed.py [--server c|aecho|both] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import resource
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

TARGET = 0.9


def run_bench(
    port: int, connections: int, size: int, duration: float, warmup: float
) -> tuple[float, float]:
    """One ``aecho bench`` run: (msgs/s, its CPU seconds per message, start-up included)."""
    cmd = [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port)]
    cmd += ["-c", str(connections), "-s", str(size), "-d", str(duration)]
    cmd += ["--warmup", str(warmup), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not out.stdout:
        raise RuntimeError(f"aecho bench failed: {out.stderr.strip()}")
    data = json.loads(out.stdout)
    if data["errors"] or data["mismatches"]:
        raise RuntimeError(f"aecho bench saw errors: {data['errors_by_kind']}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return float(data["msgs_per_s"]), cpu / max(data["messages"], 1)


def echo_epoll_path() -> Path:
    """The compiled minimal C epoll echo server (benchmarks/echo_epoll.c)."""
    return build_c("echo_epoll")


def compare(argv: list[str], args: argparse.Namespace) -> float:
    """Alternate loadgen and aecho bench against one server; return the median ratio."""
    c_rates: list[float] = []
    py_rates: list[float] = []
    c_cpu: list[float] = []
    py_cpu: list[float] = []
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
                    c_cpu.append(r["loadgen_cpu_s"] / max(r["messages"], 1))
                else:
                    rate, cpu = run_bench(
                        port, args.connections, args.size, args.duration, args.warmup
                    )
                    py_rates.append(rate)
                    py_cpu.append(cpu)
                # The server's CPU share (of one core) shows which side was the bottleneck.
                busy = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
                row += [rate, busy]
            print(f"{i + 1:>5}  {row[0]:>15,.0f}  {row[1]:>6.0%}  {row[2]:>13,.0f}  {row[3]:>6.0%}")
    ratio = median(py_rates) / median(c_rates)
    print(
        f"median: loadgen {median(c_rates):,.0f} msgs/s, aecho bench {median(py_rates):,.0f} "
        f"msgs/s, ratio {ratio:.2f} (target >= {TARGET})\n"
        f"CPU per message (user+sys, start-up included): loadgen "
        f"{median(c_cpu) * 1e6:.1f} us, aecho bench {median(py_cpu) * 1e6:.1f} us\n"
    )
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", choices=["c", "aecho", "both"], default="c")
    ap.add_argument("--rounds", type=int, default=7)
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
    return 0 if min(ratios) >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
