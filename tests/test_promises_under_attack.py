"""README promises tried as hostile peers and careless operators would try them.

Each test names the sentence it checks.  Real servers on port 0 (readiness from
NOTIFY_SOCKET), real commands in subprocesses, every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aecho.process.pidfile import parse_pid, pid_alive
from tests.conftest import (
    SERVING,
    Daemons,
    ServerProcess,
    free_port,
    run_aecho,
    run_bench,
    threaded_server,
    wait_until,
)

ServeProcess = Callable[..., ServerProcess]
T = "tests.handlers_for_tests:"
DAEMON_PID = re.compile(r"\(pid (\d+),")


def _line(sock: socket.socket, timeout: float) -> bytes:
    """One reply line; what came before EOF, or b"" when nothing came within ``timeout``."""
    sock.settimeout(timeout)
    got = b""
    try:
        while not got.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return got


def _echoes(port: int, payload: bytes = b"hello\n", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            return _line(sock, timeout) == payload
    except OSError:
        return False


# -- offload: a worker that dies ---------------------------------------------------------------


@pytest.mark.parametrize("framing", ["line", "raw"])
def test_a_worker_that_dies_leaves_every_other_connection_unaffected(
    serve_process: ServeProcess, framing: str
) -> None:
    """README, Offload, Faults: "A worker that dies (crash, SIGKILL, segfault) is replaced;
    the message that killed it ... gets the same treatment (ERR WorkerDied: ...), every
    other connection is unaffected."

    Batches mix connections: failing the whole batch of a dying worker would answer the
    innocent connections that shared it ``ERR WorkerDied`` (line framing) or close them
    (raw).
    """
    server = serve_process(
        "--offload", "process", "--pool-size", "1", "--framing", framing, "--handler", T + "crash"
    )
    stop = threading.Event()
    wrong: list[str] = []
    trips = [0] * 8

    def innocent(i: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                n = 0
                while not stop.is_set():
                    msg = b"m%d-%d\n" % (i, n)
                    sock.sendall(msg)
                    got = _line(sock, 30)
                    if got != msg:
                        wrong.append(f"connection {i}, message {n}: got {got[:60]!r}")
                        return
                    n += 1
                    trips[i] += 1
        except OSError as exc:
            wrong.append(f"connection {i}: {exc!r}")

    threads = [threading.Thread(target=innocent, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: min(trips) >= 50, timeout=30), "the innocent traffic never ran"
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as poison:
                poison.sendall(b"crash\n")
                _line(poison, 30)  # its own ERR WorkerDied (line) or its close (raw)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert wrong == [], f"{len(wrong)} innocent connections hurt, first: {wrong[:3]}"


def _nofile_100() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))


def test_a_worker_that_dies_while_descriptors_run_out_is_still_replaced(
    serve_process: ServeProcess,
) -> None:
    """README: "A worker that dies (crash, SIGKILL, segfault) is replaced" and, out of
    descriptors (EMFILE), "The loop keeps serving the connections it has".

    The replacement's socket cannot be made while descriptors are out.  The slot must be
    retried later, not left without a worker for good, and a task taken from the queue
    must not be dropped: the connection's next message gets its reply once descriptors
    are free.
    """
    server = serve_process(
        "--offload", "process", "--pool-size", "1", "--framing", "line", "--handler", T + "crash",
        preexec_fn=_nofile_100,
    )  # fmt: skip
    others: list[socket.socket] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as first:
        try:
            first.sendall(b"ok\n")
            assert _line(first, 10) == b"ok\n"
            for _ in range(200):  # more than 100 descriptors can hold
                others.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            first.sendall(b"crash\n")
            assert _line(first, 10).startswith(b"ERR WorkerDied")
            first.sendall(b"after\n")
        finally:
            for sock in others:
                sock.close()
        # Every other connection is closed: descriptors are plentiful again.
        assert _line(first, 20) == b"after\n", "no reply after the worker died out of descriptors"
    assert wait_until(lambda: _echoes(server.port), timeout=20), "the pool never served again"


# -- PROXY protocol: the per-IP limit ---------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_untrusted_peers_that_send_nothing_count_against_the_per_ip_limit(
    serve_process: ServeProcess, workers: str
) -> None:
    """README: "--max-connections-per-ip N | at most N open connections per client address"
    and, with --proxy-protocol, "Any other peer is served as if the option were off".

    A peer outside --proxy-allow-from that connects and sends nothing must count against
    the per-IP limit from accept, as without the option; counted only against
    --max-connections, one address would fill the server and lock every other client out.
    """
    server = serve_process(
        "--proxy-protocol", "v2", "--proxy-allow-from", "10.0.0.0/8",
        "--max-connections", "6", "--max-connections-per-ip", "2", "--workers", workers,
    )  # fmt: skip
    idle: list[socket.socket] = []
    try:
        for _ in range(6):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))  # one client address, not the proxy's
            sock.connect(("127.0.0.1", server.port))
            idle.append(sock)

        def still_open() -> int:
            n = 0
            for sock in idle:
                sock.setblocking(False)
                try:
                    if sock.recv(1):
                        n += 1
                except BlockingIOError:
                    n += 1
                except OSError:
                    pass
            return n

        assert wait_until(lambda: still_open() <= 2, timeout=5), (
            f"{still_open()} connections open from 127.0.0.2 with --max-connections-per-ip 2"
        )
        assert _echoes(server.port), "a client from another address was locked out"
    finally:
        for sock in idle:
            sock.close()


# -- pidfiles ----------------------------------------------------------------------------------


def test_a_pidfile_saved_by_an_editor_does_not_make_a_running_server_look_stopped(
    daemons: Daemons,
    tmp_path: Path,
) -> None:
    """README: "a pidfile rewritten by hand or a pid since reused by another program gets
    one line and exit 1, and nothing is signalled"; status prints "running or not".

    Editors and ``sed -i`` save by writing a new file and renaming it over the old one.
    The renamed pidfile holds no lock; status must not say "not running" and exit 3 while
    pid N serves, and stop must not say "not running" and exit 0, leaving it running.
    """
    daemon = daemons.start()
    edited = tmp_path / "aecho.pid.edit"
    edited.write_text(daemon.pidfile.read_text())  # the same content
    os.rename(edited, daemon.pidfile)  # as `sed -i` or an editor saves it

    status = run_aecho("status", "--pidfile", str(daemon.pidfile))
    assert pid_alive(daemon.pid)
    assert status.returncode != 3, f"status says not running while it serves: {status.stdout}"

    stop = run_aecho("stop", "--pidfile", str(daemon.pidfile))
    assert stop.returncode == 1 or not pid_alive(daemon.pid), (
        f"stop exited {stop.returncode} ({stop.stdout.strip()}) and the server still runs"
    )


def test_a_new_server_refuses_a_replaced_pidfile_that_names_a_live_server(
    daemons: Daemons,
    tmp_path: Path,
) -> None:
    """README: a pidfile replaced under a running server makes "stop and status report it,
    and a new server refuse to act on it"; the first keeps serving."""
    daemon = daemons.start()
    edited = tmp_path / "aecho.pid.edit"
    edited.write_text(daemon.pidfile.read_text())
    os.rename(edited, daemon.pidfile)  # as an editor saves it: the lock is gone
    second = run_aecho("serve", "--daemon", "--port", "0", "--pidfile", str(daemon.pidfile))
    if second.returncode == 0 and (m := SERVING.match(second.stdout.strip())):
        daemons.track(int(m.group(2)))
    assert second.returncode == 1, second.stdout
    assert "stop that server or use another --pidfile" in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1, second.stderr
    assert parse_pid(daemon.pidfile.read_text()) == daemon.pid
    assert _echoes(daemon.port)


def test_stop_by_port_never_stops_a_server_on_another_port(tmp_path: Path) -> None:
    """README: "`stop` and `status` found through `--port` or `--unix` act only on a server
    that serves there".  The default pidfile for port B, renamed from a running server's on
    port A (its lock goes with the file), names a server that does not serve on B."""
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    started = run_aecho("serve", "--daemon", "--port", "0", env=env)
    m = SERVING.match(started.stdout.strip())
    assert started.returncode == 0 and m, started.stderr
    port, pid = int(m.group(1)), int(m.group(2))
    try:
        other = free_port()
        os.rename(tmp_path / f"aecho-{port}.pid", tmp_path / f"aecho-{other}.pid")
        for command in ("stop", "status"):
            result = run_aecho(command, "--port", str(other), env=env)
            assert result.returncode == 1, f"{command}: {result.stdout}"
            assert result.stderr.startswith("aecho: error: "), result
            assert f"not on port {other}" in result.stderr, result
        assert pid_alive(pid) and _echoes(port), "stop --port signalled the server elsewhere"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _unix_echoes(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"hello\n")
            return _line(sock, 5) == b"hello\n"
    except OSError:
        return False


@contextlib.contextmanager
def _unix_daemon(path: Path, env: dict[str, str]) -> Iterator[int]:
    """``aecho serve --daemon --unix PATH`` with its default pidfile; yields its pid, kills it."""
    started = run_aecho("serve", "--daemon", "--unix", str(path), env=env)
    assert started.returncode == 0, started.stderr
    m = DAEMON_PID.search(started.stdout)
    assert m, started.stdout
    pid = int(m.group(1))
    try:
        yield pid
    finally:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _two_socket_dirs(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    run = tmp_path / "run"
    for d in (run, tmp_path / "a", tmp_path / "b"):
        d.mkdir()
    env = {"XDG_RUNTIME_DIR": str(run)}
    return tmp_path / "a" / "echo.sock", tmp_path / "b" / "echo.sock", env


def test_stop_unix_path_never_stops_the_server_on_another_path(tmp_path: Path) -> None:
    """README: "`aecho stop [--pidfile P | --port N | --unix PATH]`" stops the server on
    PATH, and stop "signals only a pid that holds the pidfile's lock and whose process title
    says it is an aecho server".

    A default pidfile named after the socket file's base name only would let
    `aecho stop --unix b/echo.sock` stop the server on a/echo.sock.
    """
    a, b, env = _two_socket_dirs(tmp_path)
    with _unix_daemon(a, env) as pid:
        stop = run_aecho("stop", "--unix", str(b), env=env)
        assert pid_alive(pid), f"stop --unix {b} stopped the server on {a}: {stop.stdout}"
        assert _unix_echoes(a)


def test_daemons_on_two_unix_paths_with_one_name_both_start(tmp_path: Path) -> None:
    """README: "Without --pidfile, a daemon uses ... aecho-unix-NAME.pid after the socket
    file's name"; two sockets are two servers.  Named after the base name only, the second
    would be refused as "already running"."""
    a, b, env = _two_socket_dirs(tmp_path)
    with _unix_daemon(a, env), _unix_daemon(b, env):
        assert _unix_echoes(a)
        assert _unix_echoes(b)


# -- aecho client -------------------------------------------------------------------------------


class _FirstByteOnly(asyncio.Protocol):
    """Answers the first byte of each read and never the rest."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data[:1])


def test_pipe_timeout_counts_bytes_still_owed_after_a_partial_reply() -> None:
    """README, pipe mode: "`--timeout` counts the server's silence only while it owes
    something: after bytes went out, ..."; "one silent past --timeout ... is one line on
    stderr and exit 1".

    A reply however short must not clear what is owed: a server that answers one byte of
    six and goes silent would hold the client forever while its input stays open.
    """
    with threaded_server(_FirstByteOnly) as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aecho", "client", "127.0.0.1", str(port), "--timeout", "500ms"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"hello\n")
            proc.stdin.flush()  # and stdin stays open
            try:
                code: int | None = proc.wait(15)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            proc.kill()
            proc.communicate(timeout=10)
    assert code == 1, "still waiting 15 s after a partial reply with --timeout 500ms"


# -- aecho bench --------------------------------------------------------------------------------


def test_bench_names_the_connection_limit_of_a_tls_server(
    serve_process: ServeProcess,
    pems: dict[str, str],
) -> None:
    """README, bench: "Each failure is explained in one line: ... the server turning
    connections away because its connection limit was reached (--max-connections)".

    Over TLS a reset during the handshake must still name the reason, not read "4
    connections failed: cannot connect to HOST:PORT: " with the reason empty.
    """
    server = serve_process(
        "--tls-cert", pems["cert"], "--tls-key", pems["key"], "--max-connections", "2"
    )
    out = run_bench(
        "127.0.0.1", str(server.port), "-c", "6", "-d", "1", "--tls", "--cafile", pems["ca"]
    )
    assert out.returncode == 1
    assert "connection limit" in out.stderr, out.stderr


def test_find_max_rate_json_keeps_its_keys_when_nothing_listens() -> None:
    """README: "`--json` gives `max_rate`, `max_p99_ms` and `steps`" (for --find-max-rate),
    and --json prints its object "also when the run fails, with the one-line reason in
    `error`": a search that cannot connect prints the search's object, not a plain run's."""
    out = run_bench("127.0.0.1", str(free_port()), "--find-max-rate", "--max-p99", "5", "--json")
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert {"max_rate", "max_p99_ms", "steps", "error"} <= set(result), sorted(result)


# -- process titles -----------------------------------------------------------------------------


# -- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTTIN, signal.SIGTTOU], ids=["TTIN", "TTOU"])
@pytest.mark.parametrize("args", [[], ["--workers", "1"]], ids=["default", "workers-1"])
def test_ttin_and_ttou_leave_a_single_serving_process_serving(
    serve_process: ServeProcess, sig: signal.Signals, args: list[str]
) -> None:
    """README, Signals: "TTIN, TTOU | - |" for a single process (one more or one less
    serving process under a supervisor).  With their default action a foreground single
    process would be suspended (state T) and stop serving until SIGCONT."""
    server = serve_process(*args)
    assert _echoes(server.port)
    server.signal(sig)
    try:
        assert wait_until(lambda: _echoes(server.port), timeout=5), "the server stopped serving"
    finally:
        os.kill(server.pid, signal.SIGCONT)
