"""``aecho serve --workers N``: a supervisor and N serving processes, on real processes.

Every test starts the real command in a subprocess (readiness from READY=1 on a
private NOTIFY_SOCKET, sent by the supervisor once every serving process serves)
and checks what the kernel and the peers see.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    ServerProcess,
    alive,
    cmdline,
    descendants,
    echo_once,
    free_port,
    run_aecho,
    wait_until,
)

TIMEOUT = 30.0


def children_titled(pid: int, prefix: bytes) -> list[int]:
    return [p for p in descendants(pid) if cmdline(p).startswith(prefix) and alive(p)]


def servers_of(srv: ServerProcess) -> list[int]:
    """The serving processes (not their pool workers) of a supervisor."""
    return children_titled(srv.pid, b"aecho: server")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_supervisor_runs_n_serving_processes(serve_process: Callable[..., ServerProcess]) -> None:
    srv = serve_process("--workers", "2")
    assert cmdline(srv.pid).startswith(
        f"aecho: supervisor 127.0.0.1:{srv.port} (2 workers)".encode()
    )
    titles = sorted(cmdline(p) for p in servers_of(srv))
    assert titles == [f"aecho: server 127.0.0.1:{srv.port} (worker {i}/2)".encode() for i in (1, 2)]
    assert srv.ready is not None and srv.ready.fields.get("MAINPID") == str(srv.pid)
    for i in range(20):
        assert echo_once(srv.port, b"%d\x00\xff\n" % i) == b"%d\x00\xff\n" % i
    assert srv.stop() == 0
    assert wait_until(lambda: not descendants(srv.pid) or not alive(srv.pid), 10)


def test_connections_spread_evenly_and_limits_hold_for_the_whole(
    serve_process: Callable[..., ServerProcess],
) -> None:
    metrics = free_port()
    srv = serve_process(
        "--workers", "2", "--metrics-port", str(metrics), "--max-connections", "1100"
    )  # fmt: skip
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) for _ in range(1000)]
    try:
        assert wait_until(lambda: scrape(metrics)["aecho_connections_accepted_total"] == 1000)
        values = scrape(metrics)
        per = [values[f'aecho_connections_open{{worker="{i}"}}'] for i in (1, 2)]
        assert sum(per) == 1000
        assert max(per) / min(per) <= 1.25, per
        # --max-connections counts every process: 100 more fit, the rest are refused.
        more = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(150)]
        held += more
        refused = 'aecho_connections_refused_total{reason="max_connections"}'

        def settled() -> bool:
            values = scrape(metrics)
            return values["aecho_connections_accepted_total"] + values[refused] == 1150

        assert wait_until(settled)
        # Two processes admitting at the same instant may each take the last place.
        assert 1100 <= scrape(metrics)["aecho_connections_accepted_total"] <= 1100 + 1
    finally:
        for sock in held:
            sock.close()
    assert srv.stop() == 0


def test_per_ip_limit_holds_across_processes(serve_process: Callable[..., ServerProcess]) -> None:
    srv = serve_process("--workers", "2", "--max-connections-per-ip", "5")
    held = []
    served = 0
    try:
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
            held.append(sock)
            try:
                sock.sendall(b"x")
                served += sock.recv(1) == b"x"
            except ConnectionResetError:
                pass  # refused: closed at once
        assert served == 5
    finally:
        for sock in held:
            sock.close()


def test_a_killed_serving_process_is_replaced_and_the_others_are_untouched(
    serve_process: Callable[..., ServerProcess],
) -> None:
    srv = serve_process("--workers", "2")
    before = servers_of(srv)
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(40)]
    for sock in socks:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # New connections are served within a second, those hashed to the victim's
    # listener included: its accept queue waits for the replacement.
    fresh = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        fresh.append(sock)
        sock.sendall(b"n")
    for sock in fresh:
        assert sock.recv(1) == b"n"
        sock.close()
    assert time.monotonic() - killed_at < 1.5
    # The survivor's connections keep echoing; the victim's were reset, nothing else.
    survivors = 0
    for sock in socks:
        try:
            sock.sendall(b"b")
            got = sock.recv(1)
        except OSError:
            got = b""
        survivors += got == b"b"
        assert got in (b"b", b""), got
        sock.close()
    assert 5 <= survivors <= 35  # the kernel spread them; the survivor kept every one
    after = servers_of(srv)
    assert len(after) == 2 and victim not in after
    assert srv.stop() == 0


def test_hup_replaces_every_process_without_a_failed_connection(
    serve_process: Callable[..., ServerProcess],
) -> None:
    srv = serve_process("--workers", "2", "--graceful-timeout", "5")
    before = set(servers_of(srv))
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def connect_all_the_time() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            try:
                if echo_once(srv.port, b"hup?\n", timeout=5) != b"hup?\n":
                    failures.append("short echo")
            except OSError as exc:
                failures.append(repr(exc))
            count[0] += 1

    threads = [threading.Thread(target=connect_all_the_time) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: count[0] > 50)
        os.kill(srv.pid, signal.SIGHUP)
        assert wait_until(lambda: not before & set(servers_of(srv)) and len(servers_of(srv)) == 2)
        mark = count[0]
        assert wait_until(lambda: count[0] > mark + 50)
    finally:
        done.set()
        for t in threads:
            t.join(TIMEOUT)
    assert failures == []
    assert srv.stop() == 0


def test_a_handler_that_cannot_load_stops_the_supervisor_with_its_error() -> None:
    started = time.monotonic()
    out = run_aecho("serve", "--port", "0", "--workers", "2", "--handler", "no_such_module_xyz:f")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "aecho: error: cannot import handler module 'no_such_module_xyz': no module named"
    ), out.stderr
    assert time.monotonic() - started < 20


def test_term_stops_everything_pools_included(serve_process: Callable[..., ServerProcess]) -> None:
    srv = serve_process("--workers", "2", "--offload", "process", "--framing", "line")
    family = descendants(srv.pid)
    pools = [p for p in family if cmdline(p).startswith(b"aecho: pool worker")]
    assert len(pools) == 2  # one CPU each: N serving processes x pool size = CPU count
    assert echo_once(srv.port, b"pooled\n") == b"pooled\n"
    assert srv.stop() == 0
    assert wait_until(lambda: not any(map(alive, family)), 20)


def test_ttin_and_ttou(serve_process: Callable[..., ServerProcess]) -> None:
    srv = serve_process("--workers", "2")
    os.kill(srv.pid, signal.SIGTTIN)
    assert wait_until(lambda: len(servers_of(srv)) == 3)
    assert wait_until(lambda: b"(3 workers)" in cmdline(srv.pid))
    # Every serving process's title follows: worker i of 3.
    assert wait_until(lambda: all(cmdline(p).endswith(b"/3)") for p in servers_of(srv)))
    # One at a time: two of one signal sent at once may arrive as one (as with nginx).
    # A retiring process is gone once it is no longer alive, not once its title is: an
    # exiting process loses its memory (and so its title) before its sockets, and a
    # connection reaching its listener in that instant is reset (README: TTOU).
    three = servers_of(srv)
    os.kill(srv.pid, signal.SIGTTOU)
    assert wait_until(lambda: sum(map(alive, three)) == 2)
    os.kill(srv.pid, signal.SIGTTOU)
    assert wait_until(lambda: sum(map(alive, three)) == 1)
    assert len(servers_of(srv)) == 1
    for _ in range(20):
        assert echo_once(srv.port, b"ping\n") == b"ping\n"
    os.kill(srv.pid, signal.SIGTTOU)  # the last one stays
    assert wait_until(lambda: b"(1 worker)" in cmdline(srv.pid))
    assert len(servers_of(srv)) == 1
    assert srv.stop() == 0


def test_metrics_are_the_totals_of_every_process(
    serve_process: Callable[..., ServerProcess],
) -> None:
    metrics = free_port()
    srv = serve_process("--workers", "2", "--metrics-port", str(metrics))
    for i in range(30):
        assert echo_once(srv.port, b"%05d" % i) == b"%05d" % i
    values = scrape(metrics)
    assert values["aecho_connections_accepted_total"] == 30
    assert values["aecho_bytes_received_total"] == 150
    assert values["aecho_bytes_sent_total"] == 150
    # Counters survive the processes that made them (a reload retires every one).
    before = set(servers_of(srv))
    os.kill(srv.pid, signal.SIGHUP)
    assert wait_until(lambda: not before & set(servers_of(srv)) and len(servers_of(srv)) == 2)
    assert wait_until(lambda: scrape(metrics)["aecho_connections_accepted_total"] == 30)
    assert echo_once(srv.port, b"more") == b"more"
    assert scrape(metrics)["aecho_bytes_sent_total"] == 154
    assert srv.stop() == 0


def test_daemon_with_workers(tmp_path: Path) -> None:
    pidfile = tmp_path / "w.pid"
    out = run_aecho("serve", "--daemon", "--port", "0", "--workers", "2", "--pidfile", str(pidfile))
    assert out.returncode == 0, out.stderr
    pid = int(pidfile.read_text())
    try:
        port = int(out.stdout.split(" (pid")[0].rsplit(":", 1)[1])
        assert echo_once(port, b"ping\n") == b"ping\n"
        status = run_aecho("status", "--pidfile", str(pidfile))
        assert status.returncode == 0
        assert f"running, pid {pid}, serving on 127.0.0.1:{port}" in status.stdout
        assert status.stdout.count("(worker ") == 2
        family = descendants(pid)
        stop = run_aecho("stop", "--pidfile", str(pidfile))
        assert stop.returncode == 0
        assert wait_until(lambda: not any(map(alive, [pid, *family])), 20)
        assert not pidfile.exists()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_workers_share_a_unix_socket(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = tmp_path / "w.sock"
    srv = serve_process("--workers", "2", "--unix", str(path))
    assert len(servers_of(srv)) == 2
    for i in range(20):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(b"u%d" % i)
            assert sock.recv(100) == b"u%d" % i
    assert srv.stop() == 0
    assert not path.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_forces_every_process(
    serve_process: Callable[..., ServerProcess], sig: signal.Signals
) -> None:
    srv = serve_process("--workers", "2", "--graceful-timeout", "60")
    family = descendants(srv.pid)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # a peer that never reads holds its process
            for _ in range(10_000):
                sock.send(b"q" * 65536)
        srv.signal(sig)
        assert srv.wait_stopping()
        assert srv.proc.poll() is None
        srv.signal(sig)
        assert srv.proc.wait(20) == 128 + sig
    assert wait_until(lambda: not any(map(alive, family)), 10)


@pytest.mark.parametrize("retire", [signal.SIGHUP, signal.SIGTTOU], ids=["HUP", "TTOU"])
def test_one_term_after_a_reload_or_ttou_is_still_graceful_for_the_retiring(
    serve_process: Callable[..., ServerProcess], retire: signal.Signals
) -> None:
    """A process retired by HUP or TTOU already has its TERM: the supervisor's first stop
    must not send it another, which would count as the second and cut its connections."""
    srv = serve_process("--workers", "2", "--framing", "line", "--graceful-timeout", "30")
    before = set(servers_of(srv))
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) for _ in range(12)]
    try:
        for sock in conns:
            sock.sendall(b"whole\n")
            assert sock.recv(16) == b"whole\n"
            sock.sendall(b"half")  # a line in progress holds its process in its stop
        os.kill(srv.pid, retire)
        if retire == signal.SIGHUP:
            assert wait_until(lambda: len(set(servers_of(srv)) - before) == 2)
            assert all(map(alive, before))  # retiring, each waiting for its lines
        else:
            assert wait_until(lambda: b"(1 worker)" in cmdline(srv.pid))
        srv.signal(signal.SIGTERM)
        assert srv.wait_stopping()
        # A forced stop would close them at once; a graceful one waits for the lines.
        deadline = time.monotonic() + 1.0
        for sock in conns:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            with pytest.raises(TimeoutError):
                sock.recv(16)
        for sock in conns:
            sock.settimeout(TIMEOUT)
            sock.sendall(b" done\n")
            assert sock.recv(16) == b"half done\n"
    finally:
        for sock in conns:
            sock.close()
    assert srv.proc.wait(TIMEOUT) == 0
