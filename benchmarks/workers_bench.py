"""``aecho serve --workers N``: what more serving processes buy, measured side by side.

    .venv/bin/python benchmarks/workers_bench.py [--reps 3] [--duration 5] [--json out.json]

Four measurements, each server freshly started, the variants taking turns within every
repetition; medians and ratios of medians are reported:

- ``burn``: ``--handler burn --framing line`` (about 1 ms of CPU per line, inline), load
  from ``aecho bench`` (32 connections, replies verified).  ``--workers 2`` against
  ``--workers 1``; target >= 1.8x on a 2-core machine.
- ``echo``: 500 x 64 B raw ping-pong from the C load generator, default options.
  ``--workers 2`` against ``--workers 1``; target >= 1.0x (the load generator shares
  the two cores with the server here, so more processes must at least not lose).
- ``spread``: 1,000 connections opened at once, counted per serving process from
  ``/metrics``: SO_REUSEPORT listeners (the default) against one shared listener
  (``--no-reuse-port``).  Target: busiest / quietest <= 1.25 with SO_REUSEPORT.
- ``reload``: four threads opening new connections (connect, echo, close) without
  pause while the supervisor gets HUP three times; target: 0 failed connections.
- ``replace``: SIGKILL one serving process while the C load generator drives the other
  one too; the time until its replacement serves (it answers the supervisor's stats
  request, which a serving process does only once it is ready); target: under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import aecho_serve, loadgen_path, median, run_loadgen, server_process, settle


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_burn(port: int, duration: float, warmup: float) -> float:
    cmd = [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port), "-c", "32"]
    cmd += ["-s", "64", "--framing", "line", "--handler", "burn", "-d", str(duration)]
    cmd += ["--warmup", str(warmup), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    data = json.loads(out.stdout)
    if data["errors"] or data["mismatches"]:
        raise RuntimeError(f"aecho bench saw errors: {out.stderr.strip()}")
    return float(data["msgs_per_s"])


def burn(workers: int, duration: float, warmup: float) -> float:
    args = aecho_serve("--workers", str(workers), "--handler", "burn", "--framing", "line")
    with server_process(args) as (_, port):
        rate = bench_burn(port, duration, warmup)
    settle()
    return rate


def echo(workers: int, duration: float, warmup: float) -> float:
    with server_process(aecho_serve("--workers", str(workers))) as (_, port):
        result = run_loadgen(port, 500, 64, duration, warmup=warmup)
    settle()
    if result.get("errors") or result.get("mismatches"):
        raise RuntimeError(f"load generator saw errors: {result}")
    return float(result["msgs_per_s"])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return {
        name: float(value)
        for line in lines
        if line and not line.startswith("#")
        for name, _, value in [line.rpartition(" ")]
    }


def spread(reuse_port: bool) -> float:
    metrics = free_port()
    args = aecho_serve("--workers", "2", "--metrics-port", str(metrics))
    if not reuse_port:
        args.append("--no-reuse-port")
    with server_process(args) as (_, port):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(1000)]
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                values = scrape(metrics)
                if values["aecho_connections_accepted_total"] >= 1000:
                    break
                time.sleep(0.05)
            per = [values[f'aecho_connections_open{{worker="{i}"}}'] for i in (1, 2)]
        finally:
            for sock in socks:
                sock.close()
    settle()
    return max(per) / max(min(per), 1.0)


def reload(hups: int) -> tuple[int, int]:
    """(failed, total) new connections while the supervisor reloads ``hups`` times."""
    failed, total = [0], [0]
    done = threading.Event()
    with server_process(aecho_serve("--workers", "2")) as (proc, port):

        def churn() -> None:
            deadline = time.monotonic() + 120
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                        sock.sendall(b"reload?\n")
                        got = b""
                        while len(got) < 8 and (chunk := sock.recv(64)):
                            got += chunk
                    failed[0] += got != b"reload?\n"
                except OSError:
                    failed[0] += 1
                total[0] += 1

        threads = [threading.Thread(target=churn) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            for _ in range(hups):
                os.kill(proc.pid, signal.SIGHUP)
                time.sleep(2.0)  # a reload of two processes takes well under a second
        finally:
            done.set()
            for t in threads:
                t.join(60)
    settle()
    return failed[0], total[0]


def replace(kills: int, duration: float) -> list[float]:
    """Seconds from SIGKILL of serving process 1 to its replacement serving, per kill."""
    metrics = free_port()
    args = aecho_serve("--workers", "2", "--metrics-port", str(metrics))
    times: list[float] = []
    with server_process(args) as (proc, port):
        load = subprocess.Popen(
            [str(loadgen_path()), "127.0.0.1", str(port), "-c", "100", "-s", "64",
             "-d", str(duration), "-w", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(kills):
                time.sleep(duration / (kills + 1))
                victim = next(
                    pid for pid in children(proc.pid)
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(
                        b"aecho: server 127.0.0.1:%d (worker 1/" % port
                    )
                )  # fmt: skip
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                key = 'aecho_connections_open{worker="1"}'
                while time.monotonic() - killed < 10:
                    if victim not in children(proc.pid) and key in scrape(metrics):
                        break
                    time.sleep(0.005)
                times.append(time.monotonic() - killed)
        finally:
            load.wait(duration + 60)
    settle()
    return times


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median taken)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    opts = parser.parse_args()
    report: dict[str, Any] = {}
    ok = True
    for name, run, target in (("burn", burn, 1.8), ("echo", echo, 1.0)):
        runs: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(opts.reps):
            for workers in (1, 2):
                rate = run(workers, opts.duration, opts.warmup)
                runs[workers].append(rate)
                print(f"{name} rep {rep + 1} --workers {workers}: {rate:,.0f} msgs/s", flush=True)
        one, two = median(runs[1]), median(runs[2])
        ratio = two / one if one else 0.0
        ok = ok and ratio >= target
        report[name] = {"workers_1": runs[1], "workers_2": runs[2], "ratio": ratio}
        verdict = "ok" if ratio >= target else "MISSED"
        print(f"{name}: median {one:,.0f} -> {two:,.0f} msgs/s, {ratio:.2f}x "
              f"(target >= {target}) {verdict}", flush=True)  # fmt: skip
    for reuse in (True, False):
        ratios = [spread(reuse) for _ in range(opts.reps)]
        key = "reuseport" if reuse else "shared"
        report[f"spread_{key}"] = ratios
        print(f"spread over 2 processes, {key} listener: busiest/quietest "
              f"median {median(ratios):.2f} (runs {', '.join(f'{r:.2f}' for r in ratios)})",
              flush=True)  # fmt: skip
    ok = ok and median(report["spread_reuseport"]) <= 1.25
    failed, total = reload(3)
    report["reload"] = {"failed": failed, "connections": total}
    print(f"reload: {failed} of {total:,} new connections failed during 3 HUPs", flush=True)
    ok = ok and failed == 0
    took = replace(3, 8.0)
    report["replace_s"] = took
    print(f"replace: a killed serving process served again after "
          f"{', '.join(f'{s * 1000:.0f}' for s in took)} ms", flush=True)  # fmt: skip
    ok = ok and max(took) < 1.0
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
