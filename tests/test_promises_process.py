"""Process and signal promises of the README: HUP, USR1, the third TERM/INT, Ctrl-C and
the pool, the supervisor's port check and its retries, the daemon's ready timeout.

Every test runs the real command in subprocesses on loopback, port 0 where it can:
readiness comes from READY=1 and STOPPING=1 on a private NOTIFY_SOCKET, and a log
line is only read after the fact, when the line itself is what the README promises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aecho.process.daemon import ready_timeout
from tests.conftest import (
    ServerProcess,
    alive,
    echo_once,
    read_line,
    run_aecho,
    wait_until,
)
from tests.test_workers import children_titled, servers_of

TIMEOUT = 30.0


def pool_workers_of(srv: ServerProcess) -> list[int]:
    return children_titled(srv.pid, b"aecho: pool worker")


def text_of(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.fixture
def flaky_handler(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A handler module that imports fine until its flag file exists; then its import
    raises, or hangs when the flag file says ``hang``.

    Yields the ``--handler`` value, the flag file and the environment that finds it.
    """
    flag = tmp_path / "broken.flag"
    (tmp_path / "flaky_handler_mod.py").write_text(
        "import os, time\n"
        f"if os.path.exists({str(flag)!r}):\n"
        f"    if open({str(flag)!r}).read() == 'hang':\n"
        "        time.sleep(60)\n"
        "    raise RuntimeError('the flag file is there')\n"
        "\n"
        "def handle(data):\n"
        "    return data\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    yield "flaky_handler_mod:handle", flag, {"PYTHONPATH": path}


# -- HUP in a single serving process ------------------------------------------------------------


def test_hup_in_a_single_serving_process_is_only_logged(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    log = tmp_path / "aecho.log"
    srv = serve_process("--log-file", str(log))
    assert echo_once(srv.port, b"before\x00\xff\n") == b"before\x00\xff\n"
    srv.signal(signal.SIGHUP)
    line = "SIGHUP: a single serving process has nothing to reload"
    assert wait_until(lambda: line in text_of(log) or srv.proc.poll() is not None, 10)
    assert srv.proc.poll() is None, srv.proc.returncode
    assert line in text_of(log), text_of(log)
    for i in range(5):
        assert echo_once(srv.port, b"after %d\x00\xff\n" % i) == b"after %d\x00\xff\n" % i
    assert srv.stop() == 0


def _default_hup() -> None:
    """Start as from a shell: SIGHUP at its default, whatever the test runner has."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_a_foreground_server_without_log_file_dies_of_hup(
    serve_process: Callable[..., ServerProcess],
) -> None:
    srv = serve_process(preexec_fn=_default_hup)
    assert echo_once(srv.port) == b"hello\x00\xff\n"
    srv.signal(signal.SIGHUP)
    assert srv.proc.wait(10) == -signal.SIGHUP


# -- the third TERM/INT ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_third_signal_exits_at_once_and_still_removes_pidfile_and_socket(
    serve_process: Callable[..., ServerProcess], tmp_path: Path, sig: signal.Signals
) -> None:
    path, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    srv = serve_process(
        "--unix", str(path), "--pidfile", str(pidfile), "--graceful-timeout", "60",
        "--framing", "line", "--offload", "process", "--pool-size", "1",
    )  # fmt: skip
    workers = pool_workers_of(srv)
    assert len(workers) == 1
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(b"first\n")
            assert read_line(sock) == b"first\n"
            # A stopped pool worker cannot exit when told to: the forced stop waits
            # for it (for seconds) while stopping the pool.
            os.kill(workers[0], signal.SIGSTOP)
            sock.sendall(b"hel")  # a line in progress holds the graceful stop
            srv.signal(sig)
            assert srv.wait_stopping()
            assert srv.proc.poll() is None
            srv.signal(sig)  # forced: every connection is cut
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert srv.proc.poll() is None  # still stopping its pool
        assert pidfile.exists() and path.exists()
        srv.signal(sig)
        third = time.monotonic()
        assert srv.proc.wait(10) == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
        assert time.monotonic() - third < 2.0
        assert not pidfile.exists()
        assert not path.exists()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- the daemon's ready timeout --------------------------------------------------------------


def test_the_daemon_ready_timeout_is_30_seconds_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AECHO_READY_TIMEOUT", raising=False)
    assert ready_timeout() == 30.0
    monkeypatch.setenv("AECHO_READY_TIMEOUT", "2.5")
    assert ready_timeout() == 2.5
    monkeypatch.setenv("AECHO_READY_TIMEOUT", "2m")
    assert ready_timeout() == 120.0
    monkeypatch.setenv("AECHO_READY_TIMEOUT", "")
    assert ready_timeout() == 30.0


# -- the supervisor --------------------------------------------------------------------------


def test_the_supervisor_retries_a_failing_serving_process_and_stops_after_three(
    serve_process: Callable[..., ServerProcess],
    flaky_handler: tuple[str, Path, dict[str, str]],
) -> None:
    handler, flag, env = flaky_handler
    srv = serve_process("--workers", "2", "--handler", handler, env=env)
    assert echo_once(srv.port) == b"hello\x00\xff\n"
    victim = sorted(servers_of(srv))[0]
    flag.touch()
    os.kill(victim, signal.SIGKILL)
    assert srv.proc.wait(20) == 1
    srv.stop()
    out = srv.output
    assert "retrying (1 of 3)" in out, out
    assert "retrying (2 of 3)" in out, out
    assert out.count("retrying (") == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("aecho: error: cannot import handler module 'flaky_handler_mod'"), out


def test_a_second_workers_server_cannot_join_the_port(
    serve_process: Callable[..., ServerProcess],
) -> None:
    first = serve_process("--workers", "2")
    second = run_aecho("serve", "--workers", "2", "--port", str(first.port), timeout=15)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"aecho: error: cannot listen on 127.0.0.1:{first.port}: address already in use: "
        "is another server on that port? Choose another --port, or --port 0 for any free port"
    ]
    for i in range(20):
        assert echo_once(first.port, b"first %d\n" % i) == b"first %d\n" % i
    assert first.stop() == 0


def test_usr1_under_workers_reopens_the_log_file_of_every_process(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    log = tmp_path / "aecho.log"
    srv = serve_process("--workers", "2", "--log-file", str(log))
    assert len(servers_of(srv)) == 2
    log.rename(tmp_path / "aecho.log.1")
    srv.signal(signal.SIGUSR1)
    wanted = [
        "aecho.supervisor: SIGUSR1: reopened log files",
        f"aecho.process[1]: SIGUSR1: reopened log file {log}",
        f"aecho.process[2]: SIGUSR1: reopened log file {log}",
    ]
    assert wait_until(lambda: all(w in text_of(log) for w in wanted), 10), text_of(log)
    assert echo_once(srv.port) == b"hello\x00\xff\n"
    assert srv.stop() == 0


@pytest.mark.parametrize("how", ["fails", "hangs"])
def test_a_hup_replacement_that_never_serves_is_abandoned_and_the_old_keeps_serving(
    serve_process: Callable[..., ServerProcess],
    flaky_handler: tuple[str, Path, dict[str, str]],
    how: str,
) -> None:
    """A replacement that fails, or that is still not ready at the ready timeout."""
    handler, flag, env = flaky_handler
    env = {**env, "AECHO_READY_TIMEOUT": "3"}
    srv = serve_process("--workers", "2", "--handler", handler, env=env)
    before = set(servers_of(srv))
    assert len(before) == 2
    flag.write_text("hang" if how == "hangs" else "raise")
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload abandoned" in srv.output, 20), srv.output
    if how == "hangs":
        assert "was not ready within 3s" in srv.output, srv.output
    assert srv.proc.poll() is None
    assert all(map(alive, before))
    assert wait_until(lambda: set(servers_of(srv)) == before, 10), (servers_of(srv), before)
    for i in range(20):
        assert echo_once(srv.port, b"old %d\x00\xff\n" % i) == b"old %d\x00\xff\n" % i
    assert set(servers_of(srv)) == before
    assert srv.stop() == 0


# -- the pool and Ctrl-C ---------------------------------------------------------------------


def test_pool_workers_ignore_ctrl_c_and_the_server_stops_gracefully(
    serve_process: Callable[..., ServerProcess],
) -> None:
    srv = serve_process(
        "--offload", "process", "--pool-size", "2", "--framing", "line",
        "--graceful-timeout", "10",
        preexec_fn=os.setsid,  # its own process group, as a terminal's job
    )  # fmt: skip
    workers = pool_workers_of(srv)
    assert len(workers) == 2
    assert os.getpgid(workers[0]) == srv.pid
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"first\nhel")
        assert read_line(sock) == b"first\n"
        os.killpg(srv.pid, signal.SIGINT)  # Ctrl-C: the whole group
        assert srv.wait_stopping()
        assert all(map(alive, workers))
        sock.sendall(b"lo\n")
        assert read_line(sock) == b"hello\n"
    assert srv.proc.wait(15) == 0
    srv.stop()
    out = srv.output
    assert "KeyboardInterrupt" not in out, out
    assert "replacing" not in out, out
    assert "Traceback" not in out, out
