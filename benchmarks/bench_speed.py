"""Is ``aecho bench`` fast enough not to be what limits a measurement?

Drives one echo server with the compiled epoll load generator (benchmarks/loadgen.c) and
with one ``aecho bench`` process (one worker, every byte verified, every latency in its
histogram), alternating, 500 connections of 64-byte ping-pong by default, and prints the
ratio of their median messages/s and each side's CPU time per message.  The target is
bench >= 90 % of loadgen against benchmarks/echo_epoll.c, a minimal C epoll echo server
(``--server aecho`` measures against ``aecho serve`` instead, ``both`` against each).

    .venv/bin/python benchmarks/bench_speed.py [--server c|aecho|both] [--rounds 7] [--workers 2]
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
    port: int, connections: int, size: int, duration: float, warmup: float, workers: int = 1
) -> tuple[float, float, list[float], list[str]]:
    """One ``aecho bench`` run: (msgs/s, its CPU seconds per message, start-up included,
    the share of a core each of its processes used in the measured window, the loop each
    process ran: "c" or "python")."""
    cmd = [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port)]
    cmd += ["-c", str(connections), "-s", str(size), "-d", str(duration)]
    cmd += ["--warmup", str(warmup), "--workers", str(workers), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not out.stdout:
        raise RuntimeError(f"aecho bench failed: {out.stderr.strip()}")
    data = json.loads(out.stdout)
    if data["errors"] or data["mismatches"]:
        raise RuntimeError(f"aecho bench saw errors: {data['errors_by_kind']}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    rate, per_message = float(data["msgs_per_s"]), cpu / max(data["messages"], 1)
    return rate, per_message, data["bench_cpu"], data.get("bench_engine", [])


def echo_epoll_path() -> Path:
    """The compiled minimal C epoll echo server (benchmarks/echo_epoll.c)."""
    return build_c("echo_epoll")


def compare(argv: list[str], args: argparse.Namespace) -> float:
    """Alternate loadgen, one aecho bench process (and, with ``--workers N``, a bench of N
    processes) against one server; return the median ratio of one bench process."""
    sides = ["loadgen", "bench"] + (["workers"] if args.workers > 1 else [])
    rates: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    bench_busy: list[float] = []
    loops: set[str] = set()
    head = ["round", "loadgen msgs/s", "srv cpu", "bench msgs/s", "srv cpu", "bench cpu"]
    if args.workers > 1:
        head += [f"bench -w {args.workers}", "srv cpu"]
    widths = [max(len(h), 7) for h in head]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    with server_process(argv) as (proc, port):
        for i in range(args.rounds):
            cells = [str(i + 1)]
            for side in sides:
                settle()
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                if side == "loadgen":
                    r = run_loadgen(
                        port, args.connections, args.size, args.duration, warmup=args.warmup
                    )
                    if r.get("errors") or r.get("mismatches"):
                        raise RuntimeError(f"loadgen saw errors: {r}")
                    rate = float(r["msgs_per_s"])
                    per_message = r["loadgen_cpu_s"] / max(r["messages"], 1)
                else:
                    workers = args.workers if side == "workers" else 1
                    rate, per_message, shares, engines = run_bench(
                        port, args.connections, args.size, args.duration, args.warmup, workers
                    )
                    loops.update(engines)
                    if side == "bench":
                        bench_busy.append(shares[0])
                rates[side].append(rate)
                cpu[side].append(per_message)
                # The server's CPU share (of one core) shows which side was the bottleneck.
                srv = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
                cells += [f"{rate:,.0f}", f"{srv:.0%}"]
                if side == "bench":
                    cells.append(f"{bench_busy[-1]:.0%}")
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    ratio = median(rates["bench"]) / median(rates["loadgen"])
    print(
        f"median: loadgen {median(rates['loadgen']):,.0f} msgs/s, aecho bench "
        f"{median(rates['bench']):,.0f} msgs/s, ratio {ratio:.2f} (target >= {TARGET})\n"
        f"CPU per message (user+sys, start-up included): loadgen "
        f"{median(cpu['loadgen']) * 1e6:.1f} us, aecho bench {median(cpu['bench']) * 1e6:.1f} us\n"
        f"aecho bench kept {median(bench_busy):.0%} of a core busy in its window (median)\n"
        f"aecho bench's loop: {', '.join(sorted(loops)) or 'not said'}"
    )
    if args.workers > 1:
        spread = median(rates["workers"]) / median(rates["loadgen"])
        print(
            f"aecho bench --workers {args.workers}: {median(rates['workers']):,.0f} msgs/s, "
            f"ratio {spread:.2f} to loadgen"
        )
    print()
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", choices=["c", "aecho", "both"], default="c")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("-c", "--connections", type=int, default=500)
    ap.add_argument("-s", "--size", type=int, default=64)
    ap.add_argument(
        "--workers", type=int, default=1, help="also run aecho bench --workers N in each round"
    )
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
