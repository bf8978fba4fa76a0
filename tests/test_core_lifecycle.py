"""Limits and lifecycle: backpressure, idle timeout, max connections, SIGTERM, EMFILE."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import (
    ServerProcess,
    alive,
    cmdline,
    descendants,
    echo_once,
    read_line,
    rss_kib,
    running_server,
    wait_until,
)

MiB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


@pytest.mark.slow
def test_a_peer_that_never_reads_does_not_grow_server_memory(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process()
    assert echo_once(server.port) == b"hello\x00\xff\n"
    before = rss_kib(server.pid)
    chunk = b"\xab" * MiB
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 60
        stalled_since = time.monotonic()
        # Push up to 1 GiB; once the server stops reading, sends stall: stop after 2 s of that.
        while sent < 1024 * MiB and time.monotonic() < deadline:
            _, writable, _ = select.select([], [sock], [], 0.2)
            if not writable:
                if time.monotonic() - stalled_since > 2.0:
                    break
                continue
            try:
                sent += sock.send(chunk)
                stalled_since = time.monotonic()
            except BlockingIOError:
                pass
        growth_mib = (rss_kib(server.pid) - before) / 1024
        assert sent > 4 * MiB  # the server did read for a while
        assert growth_mib < 64, f"server RSS grew {growth_mib:.1f} MiB after {sent / MiB:.0f} MiB"
        # Other peers are still served while this one is stuck.
        assert echo_once(server.port) == b"hello\x00\xff\n"
    assert server.stop() == 0


@pytest.mark.asyncio
async def test_idle_connections_are_closed_and_active_ones_kept() -> None:
    async with running_server(idle_timeout=0.4) as server:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", server.port)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        # The busy peer talks every 0.1 s for 1.2 s (3x the timeout) and must stay open.
        for i in range(12):
            busy_w.write(b"%d" % i)
            assert await asyncio.wait_for(busy_r.readexactly(len(b"%d" % i)), 5) == b"%d" % i
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(idle_r.read(), 5) == b""  # EOF: closed by the server
        assert time.monotonic() - started < 5
        busy_w.write(b"alive")
        assert await asyncio.wait_for(busy_r.readexactly(5), 5) == b"alive"
        for w in (idle_w, busy_w):
            w.close()
            await w.wait_closed()


@pytest.mark.asyncio
async def test_max_connections_refuses_the_excess_and_serves_the_rest() -> None:
    async with running_server(max_connections=5) as server:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        for r, w in conns:  # all five admitted and served
            w.write(b"in")
            assert await asyncio.wait_for(r.readexactly(2), 5) == b"in"
        extra_r, extra_w = await asyncio.open_connection("127.0.0.1", server.port)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            extra_w.write(b"out")
            await asyncio.wait_for(extra_r.readexactly(3), 5)
        assert server.stats.refused == 1
        for r, w in conns:
            w.write(b"still")
            assert await asyncio.wait_for(r.readexactly(5), 5) == b"still"
        for _, w in [*conns, (extra_r, extra_w)]:
            w.close()
            with contextlib.suppress(ConnectionResetError):
                await w.wait_closed()
        # Room again once the others are gone.
        assert await asyncio.wait_for(_wait_for_room(server.port), 10)


async def _wait_for_room(port: int) -> bool:
    for _ in range(100):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(b"x")
            if await asyncio.wait_for(r.read(1), 5) == b"x":
                return True
        except ConnectionResetError:
            pass
        finally:
            w.close()
        await asyncio.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigterm_delivers_every_in_flight_reply_and_exits_zero(
    serve_process: Callable[..., ServerProcess],
) -> None:
    grace = 15.0
    server = serve_process("--graceful-timeout", str(grace))
    payloads = [random.Random(i).randbytes(256 * 1024) for i in range(200)]
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in payloads]

    echoing = threading.Barrier(len(payloads) + 1, timeout=60)

    def exchange(i: int) -> bytes:
        sock = socks[i]
        sock.sendall(payloads[i])
        got = bytearray(sock.recv(65536))
        # Echo has begun: the server has this connection and has read from it.
        echoing.wait()
        while got and len(got) < len(payloads[i]):
            data = sock.recv(65536)
            if not data:
                break
            got += data
        tail = sock.recv(1)  # then the server closes: EOF, not a reset
        sock.close()
        return bytes(got) + tail

    with ThreadPoolExecutor(max_workers=200) as pool:
        futures = [pool.submit(exchange, i) for i in range(200)]
        # Every exchange is under way, none finished (each waits here): the signal
        # lands with 200 echoes in flight.
        echoing.wait()
        stopped_at = time.monotonic()
        server.signal(signal.SIGTERM)
        results = [f.result(timeout=120) for f in futures]
    rc = server.proc.wait(grace + 10)
    elapsed = time.monotonic() - stopped_at
    assert rc == 0
    assert elapsed < grace
    for i, got in enumerate(results):
        assert got == payloads[i], f"connection {i}: {len(got)} of {len(payloads[i])} bytes"


def test_second_sigint_forces_exit(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process("--graceful-timeout", "60")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        # A peer that sends and never reads keeps the graceful stop waiting.
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            for _ in range(10_000):
                sock.send(b"q" * 65536)
        server.signal(signal.SIGINT)
        assert server.wait_stopping()
        assert server.proc.poll() is None
        server.signal(signal.SIGINT)
        assert server.proc.wait(10) == 130


def test_second_sigterm_forces_the_stop_and_still_cleans_up(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    server = serve_process(
        "--unix", str(path), "--pidfile", str(pidfile), "--graceful-timeout", "60",
        "--offload", "process", "--pool-size", "1",
    )  # fmt: skip
    workers = [pid for pid in descendants(server.pid) if cmdline(pid).startswith(b"aecho: pool")]
    assert workers
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.setblocking(False)
        # A peer that sends and never reads keeps the graceful stop waiting.
        with pytest.raises(BlockingIOError):
            for _ in range(10_000):
                sock.send(b"q" * 65536)
        server.signal(signal.SIGTERM)
        assert server.wait_stopping()
        assert server.proc.poll() is None
        server.signal(signal.SIGTERM)
        assert server.proc.wait(20) == 128 + signal.SIGTERM
    assert not path.exists()
    assert not pidfile.exists()
    assert wait_until(lambda: not any(map(alive, workers)), 10)


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_out_of_descriptors_pauses_accepting_and_recovers(
    serve_process: Callable[..., ServerProcess], loop: str
) -> None:
    server = serve_process("--loop", loop, preexec_fn=_limit_fds)
    held: list[socket.socket] = []
    for _ in range(200):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", server.port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    # The server is at its descriptor limit now: it must neither exit nor spin.
    cpu_before = cpu_seconds(server.pid)
    time.sleep(1.0)
    assert server.proc.poll() is None
    assert cpu_seconds(server.pid) - cpu_before < 0.5
    for sock in held:
        sock.close()
    assert wait_until(lambda: _echoes_quietly(server.port), 20, 0.2)
    assert server.stop() == 0
    assert "Traceback" not in server.output
    # Said once, on either loop (uvloop's own accept is silent about it).
    assert server.output.count("out of file descriptors") == 1, server.output


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_stop_while_out_of_descriptors_is_quiet(
    serve_process: Callable[..., ServerProcess], loop: str
) -> None:
    """asyncio's own accept loop scheduled a retry per backlog slot on EMFILE: thousands a
    second, each an ERROR line once the listener had closed."""
    server = serve_process("--loop", loop, preexec_fn=_limit_fds)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(100)]
    try:
        assert wait_until(lambda: len(os.listdir(f"/proc/{server.pid}/fd")) >= 60)
        time.sleep(1.5)  # out of descriptors past a retry's delay: retries would be due
        assert server.stop() == 0
    finally:
        for sock in held:
            sock.close()
    assert " ERROR " not in server.output, server.output[-2000:]
    assert server.output.count("out of file descriptors") == 1, server.output[-2000:]


@pytest.mark.slow
def test_a_stop_while_out_of_descriptors_serves_the_queued_ones(
    serve_process: Callable[..., ServerProcess],
) -> None:
    """Out of descriptors, peers wait in the accept queue (aecho's own accept loop, under
    asyncio; uvloop's accepts and closes them); a stop takes and serves them, with no idle
    sweeper running (--idle-timeout 0) and nothing else open."""
    server = serve_process("--loop", "asyncio", "--idle-timeout", "0", preexec_fn=_limit_fds)
    conns = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(90)]
    try:
        assert wait_until(lambda: len(os.listdir(f"/proc/{server.pid}/fd")) >= 60)
        for i, sock in enumerate(conns):
            sock.sendall(b"ping %d\n" % i)
        # The served ones answer; the queued ones cannot until the stop takes them.
        served: set[int] = set()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:
            ready, _, _ = select.select([c for c in conns if id(c) not in served], [], [], 0.1)
            for sock in ready:
                served.add(id(sock))
                quiet_since = time.monotonic()
        waiting = [(i, c) for i, c in enumerate(conns) if id(c) not in served]
        assert served and waiting, (len(served), len(waiting))
        for sock in conns:
            if id(sock) in served:
                sock.close()
        server.signal(signal.SIGTERM)
        for i, sock in waiting:
            assert read_line(sock) == b"ping %d\n" % i
        assert server.proc.wait(30) == 0
    finally:
        for sock in conns:
            sock.close()


def _echoes_quietly(port: int) -> bool:
    try:
        return echo_once(port, timeout=2) == b"hello\x00\xff\n"
    except OSError:
        return False


@pytest.mark.parametrize(
    "args",
    [
        ["--loop", "uvloop"],
        ["--loop", "asyncio"],
        ["--workers", "2"],
        # No idle sweeper: nothing else yields to the loop before the stop's own sweep.
        ["--loop", "uvloop", "--idle-timeout", "0"],
        ["--loop", "asyncio", "--idle-timeout", "0"],
    ],
    ids=str,
)
def test_connections_waiting_in_the_accept_queue_are_served_at_stop(
    serve_process: Callable[..., ServerProcess], args: list[str]
) -> None:
    """A stopping server takes what its listeners' queues hold instead of resetting it."""
    server = serve_process(*args)
    stopped = [server.pid, *descendants(server.pid)]
    for pid in stopped:  # the kernel completes the handshakes; nobody accepts them
        os.kill(pid, signal.SIGSTOP)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(100)]
    server.signal(signal.SIGTERM)
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    served = 0
    for sock in socks:
        with sock:
            sock.sendall(b"q")
            served += sock.recv(1) == b"q"
    assert served == 100
    assert server.proc.wait(30) == 0


@pytest.mark.parametrize("offload", ["inline", "process"])
def test_sigterm_lets_a_line_in_progress_complete_then_closes(
    serve_process: Callable[..., ServerProcess], offload: str
) -> None:
    server = serve_process(
        "--framing", "line", "--graceful-timeout", "10", "--offload", offload, "--pool-size", "1"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"first\nhel")
        assert read_line(sock) == b"first\n"  # the same read carried "hel"
        server.signal(signal.SIGTERM)
        assert server.wait_stopping()
        time.sleep(0.5)  # the peer pauses mid-line, far longer than a shutdown sweep
        sock.sendall(b"lo\n")
        assert read_line(sock) == b"hello\n"
        # No new message is started: the connection ends once the reply is out (a
        # line sent after that meets a closed socket: EOF, or a reset).
        with contextlib.suppress(OSError):
            sock.sendall(b"next\n")
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
    assert server.proc.wait(15) == 0


def _stock_shell_limits() -> None:
    """What a login shell gives: soft 1024, the hard limit left as it is."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


@pytest.mark.slow
def test_started_under_soft_1024_the_server_holds_10000_connections(
    serve_process: Callable[..., ServerProcess],
) -> None:
    wanted = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 20_000:
        pytest.skip(f"needs a hard descriptor limit of 20,000 or more (have {hard})")
    server = serve_process("--max-connections", str(wanted), preexec_fn=_stock_shell_limits)
    socks: list[socket.socket] = []
    # This client needs its own 10,000 descriptors.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * wanted + 1024), hard))
    try:
        deadline = time.monotonic() + 120
        for _ in range(wanted):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        for sock in socks:
            sock.sendall(b"!")
        served = 0
        for sock in socks:
            if time.monotonic() > deadline:
                break
            served += sock.recv(1) == b"!"
        assert served == wanted, f"{served} of {wanted} connections served"
        assert "file descriptor limit" in server.output and "raised from 1024" in server.output
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert server.stop() == 0
