"""Idle memory: server RSS growth per idle connection, aecho vs the reference servers.

    .venv/bin/python benchmarks/idle_memory.py [-n 10000] [--reps 3]

For each server (a fresh subprocess, pinned to CPU 0): a client subprocess (this script with
``--client``, pinned to CPU 1) opens and closes 100 warm-up connections, so one-time
allocations (read buffers, first-use caches) land in the baseline.  The baseline RSS is
taken, the client opens N connections and echoes one byte on each (proof the server accepted
and serves every one of them), the RSS is taken again once it stops moving, and the client
checks that all N are still open.  Growth per connection = (after - baseline) / N.

The client needs N file descriptors and the server N plus a few; RLIMIT_NOFILE is raised to
its hard limit in both.
"""

from __future__ import annotations

import argparse
import errno
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, aecho_serve, median, pinned, rss_kib, server_process

SERVERS: dict[str, list[str]] = {
    "aecho": aecho_serve(),
    "uvloop-ref": [sys.executable, str(HERE / "ref_uvloop.py")],
    "streams-ref": [sys.executable, str(HERE / "ref_streams.py")],
    "streams-uvloop": [sys.executable, str(HERE / "ref_streams.py"), "--loop", "uvloop"],
}
WARMUP_CONNECTIONS = 100
CONNECT_BATCH = 1000
TIMEOUT_S = 120.0


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- client side (a separate process) -------------------------------------------------------


def open_connections(port: int, n: int) -> list[socket.socket]:
    """Open ``n`` connections, a batch at a time so the listen backlog never overflows."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + TIMEOUT_S
    while len(socks) < n:
        batch = []
        for _ in range(min(CONNECT_BATCH, n - len(socks))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
            batch.append(s)
            sel.register(s, selectors.EVENT_WRITE)
        waiting = len(batch)
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"connected {len(socks)} of {n}")
            for key, _ in sel.select(1.0):
                s = key.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                waiting -= 1
                if err := s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
        socks.extend(batch)
    sel.close()
    return socks


def echo_one_byte(socks: list[socket.socket]) -> None:
    """Send one byte on every connection and wait until each has come back."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.send(b"x")
        sel.register(s, selectors.EVENT_READ)
    waiting = len(socks)
    deadline = time.monotonic() + TIMEOUT_S
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{waiting} of {len(socks)} connections never echoed")
        for key, _ in sel.select(1.0):
            s = key.fileobj  # type: ignore[assignment]
            if s.recv(16) != b"x":
                raise ConnectionError("bad or no echo: the server closed a connection")
            sel.unregister(s)
            waiting -= 1
    sel.close()


def still_open(socks: list[socket.socket]) -> int:
    """How many connections the server has neither closed nor reset."""
    alive = 0
    for s in socks:
        try:
            s.recv(1)
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def client(port: int, n: int) -> int:
    """Driven over stdin/stdout by the parent: warm up, open n, report, check, close."""
    raise_nofile()
    warm = open_connections(port, WARMUP_CONNECTIONS)
    echo_one_byte(warm)
    for s in warm:
        s.close()
    print("warm", flush=True)
    sys.stdin.readline()
    socks = open_connections(port, n)
    echo_one_byte(socks)
    print("ready", flush=True)
    sys.stdin.readline()
    print(f"alive {still_open(socks)}", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    return 0


# -- parent side -----------------------------------------------------------------------------


def steady_rss(pid: int) -> int:
    """RSS once two readings half a second apart agree within 64 KiB (or after 10 s)."""
    last = rss_kib(pid)
    for _ in range(20):
        time.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) <= 64:
            return now
        last = now
    return last


def measure(server: str, n: int) -> tuple[int, int, int]:
    """Return (baseline KiB, after KiB, connections still open) for one server."""
    raise_nofile()  # inherited by the server subprocess
    with server_process(pinned(SERVERS[server], 0)) as (proc, port):
        cmd = [sys.executable, __file__, "--client", str(port), "-n", str(n)]
        cli = subprocess.Popen(
            pinned(cmd, 1), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert cli.stdin is not None and cli.stdout is not None
        try:
            if cli.stdout.readline().strip() != "warm":
                raise RuntimeError("client failed during warm-up")
            time.sleep(0.5)  # let the server forget the warm-up connections
            base = steady_rss(proc.pid)
            cli.stdin.write("go\n")
            cli.stdin.flush()
            if cli.stdout.readline().strip() != "ready":
                raise RuntimeError(f"client failed to open {n} connections")
            after = steady_rss(proc.pid)
            cli.stdin.write("check\n")
            cli.stdin.flush()
            alive = int(cli.stdout.readline().split()[1])
            cli.stdin.write("done\n")
            cli.stdin.flush()
            cli.wait(TIMEOUT_S)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    return base, after, alive


def main() -> int:
    parser = argparse.ArgumentParser(description="server RSS per idle connection")
    parser.add_argument("-n", type=int, default=10_000, help="idle connections")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        return client(args.client, args.n)
    servers = args.servers.split(",")
    if unknown := [s for s in servers if s not in SERVERS]:
        print(f"idle_memory: unknown server: {', '.join(unknown)}", file=sys.stderr)
        return 2
    per_conn: dict[str, list[float]] = {s: [] for s in servers}
    for rep in range(1, args.reps + 1):
        for server in servers:
            base, after, alive = measure(server, args.n)
            b = 1024 * (after - base) / args.n
            per_conn[server].append(b)
            print(
                f"rep {rep} {server:<14} baseline {base / 1024:6.1f} MiB  with {args.n} idle "
                f"{after / 1024:6.1f} MiB  -> {b:6.0f} B/conn  ({alive} of {args.n} still open)",
                flush=True,
            )
            if alive != args.n:
                print(f"  !! {server} closed {args.n - alive} connections", flush=True)
    print(f"\n| server | RSS growth per idle connection ({args.n} open), median | min-max |")
    print("|---|--:|--:|")
    for server, values in per_conn.items():
        print(f"| {server} | {median(values):,.0f} B | {min(values):,.0f}-{max(values):,.0f} B |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
