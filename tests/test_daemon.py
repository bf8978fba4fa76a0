"""``aecho serve --daemon``, ``stop`` and ``status``: the real command in subprocesses.

Every daemon a test starts is killed by pid at teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aecho.daemon import parse_pidfile, pid_alive
from tests.conftest import wait_until

SERVING = re.compile(r"^aecho serving on 127\.0\.0\.1:(\d+) \(pid (\d+)\)$")
CMD_TIMEOUT = 60.0


def aecho(
    *args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aecho", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        pass_fds=pass_fds,
        timeout=CMD_TIMEOUT,
    )


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()


def zombie_children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = proc_stat(int(name))
            if fields[0] == "Z" and int(fields[1]) == parent:
                found.append(int(name))
    return found


def echo_once(port: int, payload: bytes = b"hello\x00\xff\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def pidfile_locked(path: Path) -> bool:
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


@dataclass
class Daemon:
    pid: int
    port: int
    pidfile: Path


class Daemons:
    """Starts daemons and remembers every pid (and pidfile) to kill at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pids: set[int] = set()
        self.pidfiles: set[Path] = set()

    def start(
        self, *args: str, pidfile: Path | None = None, env: dict[str, str] | None = None
    ) -> Daemon:
        pidfile = pidfile or self.tmp_path / "aecho.pid"
        self.pidfiles.add(pidfile)
        result = aecho(
            "serve", "--daemon", "--port", "0", "--pidfile", str(pidfile), *args, env=env
        )
        m = SERVING.match(result.stdout.strip())
        if m:
            self.pids.add(int(m.group(2)))
        assert result.returncode == 0, result.stderr
        assert m, result.stdout
        return Daemon(pid=int(m.group(2)), port=int(m.group(1)), pidfile=pidfile)

    def track(self, pid: int) -> None:
        self.pids.add(pid)

    def cleanup(self) -> None:
        for path in self.pidfiles:
            with contextlib.suppress(OSError):
                info = parse_pidfile(path.read_text())
                if info.pid is not None and info.pid != os.getpid():
                    self.pids.add(info.pid)
        for pid in self.pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


def test_daemon_detaches_and_echoes(daemons: Daemons, tmp_path: Path) -> None:
    # A descriptor the daemon inherits from its caller must not survive detaching.
    leak_r, leak_w = os.pipe()
    try:
        pidfile = tmp_path / "d.pid"
        daemons.pidfiles.add(pidfile)
        result = aecho(
            "serve", "--daemon", "--port", "0", "--pidfile", str(pidfile), pass_fds=(leak_w,)
        )
        m = SERVING.match(result.stdout.strip())
        assert m, (result.stdout, result.stderr)
        assert result.returncode == 0
        port, pid = int(m.group(1)), int(m.group(2))
        daemons.track(pid)

        assert echo_once(port) == b"hello\x00\xff\n"

        state, ppid, _pgrp, session = proc_stat(pid)[:4]
        assert state != "Z"
        assert int(ppid) != os.getpid()
        assert int(session) != os.getsid(0)
        assert int(session) != pid  # not a session leader: it can never acquire a terminal
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            assert "Umask:\t0022" in f.read()
        targets = {
            int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
        }
        assert targets[0] == targets[1] == targets[2] == "/dev/null"
        assert f"pipe:[{os.fstat(leak_w).st_ino}]" not in targets.values()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().startswith(f"aecho: server 127.0.0.1:{port}".encode())

        info = parse_pidfile(pidfile.read_text())
        assert info.pid == pid
        assert info.address == f"127.0.0.1:{port}"
        assert pidfile_locked(pidfile)
    finally:
        os.close(leak_r)
        os.close(leak_w)


def test_status_stop_and_stop_again(daemons: Daemons) -> None:
    d = daemons.start()
    status = aecho("status", "--pidfile", str(d.pidfile))
    assert status.returncode == 0, status.stdout
    assert f"running, pid {d.pid}, serving on 127.0.0.1:{d.port}, up " in status.stdout
    # Without a log file, SIGHUP must not kill a daemon (it has no terminal to lose).
    os.kill(d.pid, signal.SIGHUP)
    assert echo_once(d.port) == b"hello\x00\xff\n"
    assert pid_alive(d.pid)

    stop = aecho("stop", "--pidfile", str(d.pidfile))
    assert stop.returncode == 0, stop.stderr
    assert f"stopped (pid {d.pid})" in stop.stdout
    assert not pid_alive(d.pid)
    assert not d.pidfile.exists()

    again = aecho("stop", "--pidfile", str(d.pidfile))
    assert again.returncode == 1
    assert "not running" in again.stderr
    status = aecho("status", "--pidfile", str(d.pidfile))
    assert status.returncode == 3
    assert "not running" in status.stdout


def test_second_daemon_on_same_pidfile_is_refused(daemons: Daemons) -> None:
    first = daemons.start()
    result = aecho("serve", "--daemon", "--port", "0", "--pidfile", str(first.pidfile))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"aecho: error: already running (pid {first.pid} on ")
    assert result.stderr.count("\n") == 1
    assert echo_once(first.port) == b"hello\x00\xff\n"
    assert parse_pidfile(first.pidfile.read_text()).pid == first.pid
    assert pidfile_locked(first.pidfile)


def test_port_in_use_is_reported_on_the_terminal(daemons: Daemons, tmp_path: Path) -> None:
    pidfile = tmp_path / "busy.pid"
    daemons.pidfiles.add(pidfile)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = aecho("serve", "--daemon", "--port", str(port), "--pidfile", str(pidfile))
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.startswith(f"aecho: error: cannot listen on 127.0.0.1:{port}: address")
    assert result.stderr.count("\n") == 1
    assert elapsed < 15
    assert not pidfile.exists()


def test_failure_inside_the_daemon_comes_back_through_the_pipe(
    daemons: Daemons, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bad.pid"
    daemons.pidfiles.add(pidfile)
    result = aecho(
        "serve", "--daemon", "--port", "0", "--pidfile", str(pidfile),
        "--handler", "no_such_module_xyz:handle",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "aecho: error: cannot import handler module 'no_such_module_xyz': "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'\n"
    )
    assert wait_until(lambda: not pidfile.exists(), timeout=10)


def test_readiness_timeout_stops_the_daemon(daemons: Daemons, tmp_path: Path) -> None:
    (tmp_path / "slow_handler_mod.py").write_text(
        "import time\ntime.sleep(60)\n\ndef handle(data):\n    return data\n"
    )
    pidfile = tmp_path / "slow.pid"
    daemons.pidfiles.add(pidfile)
    env = {"PYTHONPATH": str(tmp_path), "AECHO_READY_TIMEOUT": "1"}
    started = time.monotonic()
    result = aecho(
        "serve", "--daemon", "--port", "0", "--pidfile", str(pidfile),
        "--handler", "slow_handler_mod:handle", env=env,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    m = re.match(r"aecho: error: the daemon \(pid (\d+)\) was not ready within 1s", result.stderr)
    assert m, result.stderr
    pid = int(m.group(1))
    daemons.track(pid)
    assert not pid_alive(pid)
    assert not pidfile.exists()


def test_stale_pidfile_is_taken_over(daemons: Daemons, tmp_path: Path) -> None:
    pidfile = tmp_path / "stale.pid"
    # A live pid that does not hold the lock is as stale as a dead one.
    pidfile.write_text(f"{os.getpid()}\naddress=127.0.0.1:1\nstarted=0\n")
    status = aecho("status", "--pidfile", str(pidfile))
    assert status.returncode == 3
    assert "stale pidfile" in status.stdout
    d = daemons.start(pidfile=pidfile)
    assert parse_pidfile(pidfile.read_text()).pid == d.pid
    assert echo_once(d.port) == b"hello\x00\xff\n"


def test_default_pidfile_in_xdg_runtime_dir(daemons: Daemons, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    expected = runtime / "aecho-0.pid"
    daemons.pidfiles.add(expected)
    result = aecho("serve", "--daemon", "--port", "0", env={"XDG_RUNTIME_DIR": str(runtime)})
    m = SERVING.match(result.stdout.strip())
    assert m, result.stderr
    daemons.track(int(m.group(2)))
    assert parse_pidfile(expected.read_text()).pid == int(m.group(2))
    assert aecho("stop", "--pidfile", str(expected)).returncode == 0
    assert not expected.exists()


def test_stop_kills_past_the_timeout(daemons: Daemons) -> None:
    d = daemons.start()
    os.kill(d.pid, signal.SIGSTOP)  # a server that cannot act on SIGTERM
    result = aecho("stop", "--pidfile", str(d.pidfile), "--timeout", "1")
    assert result.returncode == 0
    assert f"pid {d.pid} did not stop within 1s after SIGTERM; killed it (SIGKILL)" in (
        result.stderr
    )
    assert not pid_alive(d.pid)
    assert not d.pidfile.exists()


def test_sighup_reopens_the_log_file(daemons: Daemons, tmp_path: Path) -> None:
    log = tmp_path / "aecho.log"
    d = daemons.start("--log-file", str(log))
    assert wait_until(lambda: "listening on" in log.read_text())
    rotated = tmp_path / "aecho.log.1"
    log.rename(rotated)
    os.kill(d.pid, signal.SIGHUP)
    assert wait_until(lambda: log.exists() and "SIGHUP: reopened log file" in log.read_text())
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", log.read_text())
    assert "SIGHUP" not in rotated.read_text()
    assert echo_once(d.port) == b"hello\x00\xff\n"
    assert aecho("stop", "--pidfile", str(d.pidfile)).returncode == 0
    assert "stopped:" in log.read_text()


def test_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    bad = tmp_path / "missing-dir" / "aecho.log"
    result = aecho("serve", "--daemon", "--port", "0", "--log-file", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith(f"aecho: error: cannot open --log-file {bad}: ")
    assert result.stderr.count("\n") == 1


def test_no_zombies_after_1000_short_connections(daemons: Daemons) -> None:
    d = daemons.start()
    for i in range(1000):
        payload = b"%d\n" % i
        assert echo_once(d.port, payload) == payload
    assert zombie_children(d.pid) == []
    assert zombie_children(os.getpid()) == []
    assert pid_alive(d.pid)


def test_foreground_server_with_pidfile(serve_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "fg.pid"
    srv = serve_process("--pidfile", str(pidfile))
    assert parse_pidfile(pidfile.read_text()).pid == srv.pid
    status = aecho("status", "--pidfile", str(pidfile))
    assert status.returncode == 0
    assert f"running, pid {srv.pid}, serving on 127.0.0.1:{srv.port}" in status.stdout
    assert srv.stop() == 0
    assert not pidfile.exists()
