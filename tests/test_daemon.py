"""``aecho serve --daemon``, ``stop`` and ``status``: the real command in subprocesses.

Every daemon a test starts is killed by pid at teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from aecho.process.pidfile import default_pidfile, lock_holder, parse_pid, pid_alive
from tests.conftest import (
    SERVING,
    Daemons,
    ServerProcess,
    echo_once,
    free_port,
    run_aecho,
    wait_until,
)

CMD_TIMEOUT = 60.0


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


def pidfile_holder(path: Path) -> int | None:
    """The pid holding the pidfile's lock (POSIX record locks report it), or None."""
    with open(path, "rb") as f:
        return lock_holder(f.fileno())


def test_daemon_detaches_and_echoes(daemons: Daemons, tmp_path: Path) -> None:
    # A descriptor the daemon inherits from its caller must not survive detaching.
    leak_r, leak_w = os.pipe()
    try:
        pidfile = tmp_path / "d.pid"
        daemons.pidfiles.add(pidfile)
        result = run_aecho(
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

        # The pid and a newline, nothing else: `kill $(cat aecho.pid)` works.
        assert pidfile.read_text() == f"{pid}\n"
        assert pidfile_holder(pidfile) == pid
        assert m.group(3) == str(pidfile)
    finally:
        os.close(leak_r)
        os.close(leak_w)


def test_status_stop_and_stop_again(daemons: Daemons) -> None:
    d = daemons.start()
    status = run_aecho("status", "--pidfile", str(d.pidfile))
    assert status.returncode == 0, status.stdout
    assert f"running, pid {d.pid}, serving on 127.0.0.1:{d.port}, up " in status.stdout
    # Without a log file, SIGHUP must not kill a daemon (it has no terminal to lose).
    os.kill(d.pid, signal.SIGHUP)
    assert echo_once(d.port) == b"hello\x00\xff\n"
    assert pid_alive(d.pid)

    stop = run_aecho("stop", "--pidfile", str(d.pidfile))
    assert stop.returncode == 0, stop.stderr
    assert f"stopped (pid {d.pid})" in stop.stdout
    assert not pid_alive(d.pid)
    assert not d.pidfile.exists()

    # Stopping a stopped service succeeds (LSB).
    again = run_aecho("stop", "--pidfile", str(d.pidfile))
    assert again.returncode == 0
    assert "not running" in again.stdout
    status = run_aecho("status", "--pidfile", str(d.pidfile))
    assert status.returncode == 3
    assert "not running" in status.stdout


def test_second_daemon_on_same_pidfile_is_refused(daemons: Daemons) -> None:
    first = daemons.start()
    result = run_aecho("serve", "--daemon", "--port", "0", "--pidfile", str(first.pidfile))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"aecho: error: already running (pid {first.pid}, ")
    assert result.stderr.count("\n") == 1
    assert echo_once(first.port) == b"hello\x00\xff\n"
    assert parse_pid(first.pidfile.read_text()) == first.pid
    assert pidfile_holder(first.pidfile) == first.pid


def test_port_in_use_is_reported_on_the_terminal(daemons: Daemons, tmp_path: Path) -> None:
    pidfile = tmp_path / "busy.pid"
    daemons.pidfiles.add(pidfile)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = run_aecho("serve", "--daemon", "--port", str(port), "--pidfile", str(pidfile))
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
    result = run_aecho(
        "serve", "--daemon", "--port", "0", "--pidfile", str(pidfile),
        "--handler", "no_such_module_xyz:handle",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    # Looked for where the command ran, though the daemon had moved to / by then.
    assert result.stderr == (
        "aecho: error: cannot import handler module 'no_such_module_xyz': no module named "
        f"'no_such_module_xyz' in {os.getcwd()} (the working directory), on PYTHONPATH or "
        "among the installed packages\n"
    )
    assert wait_until(lambda: not pidfile.exists(), timeout=10)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one", "workers"])
def test_readiness_timeout_stops_the_daemon(
    daemons: Daemons, tmp_path: Path, workers: tuple[str, ...]
) -> None:
    """Everything it started goes with it: no serving process is left holding the port."""
    (tmp_path / "slow_handler_mod.py").write_text(
        "import time\ntime.sleep(60)\n\ndef handle(data):\n    return data\n"
    )
    pidfile = tmp_path / "slow.pid"
    daemons.pidfiles.add(pidfile)
    env = {"PYTHONPATH": str(tmp_path), "AECHO_READY_TIMEOUT": "1"}
    port = free_port()
    started = time.monotonic()
    result = run_aecho(
        "serve", "--daemon", "--port", str(port), "--pidfile", str(pidfile),
        "--handler", "slow_handler_mod:handle", *workers, env=env,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    m = re.match(r"aecho: error: the daemon \(pid (\d+)\) was not ready within 1s", result.stderr)
    assert m, result.stderr
    pid = int(m.group(1))
    daemons.track(pid)
    assert not pid_alive(pid)
    assert not pidfile.exists()
    assert wait_until(lambda: port_is_free(port), 10)


def test_stale_pidfile_is_taken_over(daemons: Daemons, tmp_path: Path) -> None:
    pidfile = tmp_path / "stale.pid"
    # A live pid that does not hold the lock is as stale as a dead one.
    pidfile.write_text(f"{os.getpid()}\n")
    status = run_aecho("status", "--pidfile", str(pidfile))
    assert status.returncode == 3
    assert "stale pidfile" in status.stdout
    d = daemons.start(pidfile=pidfile)
    assert parse_pid(pidfile.read_text()) == d.pid
    assert echo_once(d.port) == b"hello\x00\xff\n"


def test_default_pidfile_in_xdg_runtime_dir(daemons: Daemons, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    started = []
    # Two --port 0 daemons: each pidfile is named by the port it really bound.
    for _ in range(2):
        result = run_aecho("serve", "--daemon", "--port", "0", env=env)
        m = SERVING.match(result.stdout.strip())
        assert m, result.stderr
        port, pid = int(m.group(1)), int(m.group(2))
        daemons.track(pid)
        expected = runtime / f"aecho-{port}.pid"
        daemons.pidfiles.add(expected)
        assert m.group(3) == str(expected)
        assert parse_pid(expected.read_text()) == pid
        started.append(expected)
    # stop and status find a default pidfile from the port, as serve --daemon named it.
    for expected in started:
        port = int(expected.name.removeprefix("aecho-").removesuffix(".pid"))
        status = run_aecho("status", "--port", str(port), env=env)
        assert status.returncode == 0, status
        assert f"serving on 127.0.0.1:{port}" in status.stdout
        stop = run_aecho("stop", "-p", str(port), env=env)
        assert stop.returncode == 0, stop
        assert "stopped (pid " in stop.stdout
        assert not expected.exists()
    gone = run_aecho("status", "--port", str(port), env=env)
    assert gone.returncode == 3
    assert gone.stdout == f"aecho: not running (no pidfile at {runtime}/aecho-{port}.pid)\n"


def test_default_pidfile_of_a_unix_socket_daemon(daemons: Daemons, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    path = tmp_path / "echo.sock"
    result = run_aecho("serve", "--daemon", "--unix", str(path), env=env)
    assert result.returncode == 0, result.stderr
    # Named after the socket file and a hash of its whole path, in XDG_RUNTIME_DIR.
    expected = runtime / Path(default_pidfile(unix=str(path))).name
    assert expected.name.startswith("aecho-unix-echo.sock-")
    daemons.pidfiles.add(expected)
    assert result.stdout.endswith(f", pidfile {expected})\n"), result.stdout
    status = run_aecho("status", "--unix", str(path), env=env)
    assert status.returncode == 0, status
    assert f"serving on {path}" in status.stdout
    assert run_aecho("stop", "--unix", str(path), env=env).returncode == 0
    assert not expected.exists()
    assert not path.exists()


def test_stop_kills_past_the_timeout(daemons: Daemons) -> None:
    d = daemons.start()
    os.kill(d.pid, signal.SIGSTOP)  # a server that cannot act on SIGTERM
    result = run_aecho("stop", "--pidfile", str(d.pidfile), "--timeout", "1")
    assert result.returncode == 0
    assert f"pid {d.pid} did not stop within 1s after SIGTERM; killed it (SIGKILL)" in (
        result.stderr
    )
    assert not pid_alive(d.pid)
    assert not d.pidfile.exists()


def test_sigusr1_reopens_the_log_file(daemons: Daemons, tmp_path: Path) -> None:
    log = tmp_path / "aecho.log"
    d = daemons.start("--log-file", str(log))
    assert wait_until(lambda: "listening on" in log.read_text())
    rotated = tmp_path / "aecho.log.1"
    log.rename(rotated)
    os.kill(d.pid, signal.SIGUSR1)
    assert wait_until(lambda: log.exists() and "SIGUSR1: reopened log file" in log.read_text())
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", log.read_text())
    assert "SIGUSR1" not in rotated.read_text()
    assert echo_once(d.port) == b"hello\x00\xff\n"
    assert run_aecho("stop", "--pidfile", str(d.pidfile)).returncode == 0
    assert "stopped:" in log.read_text()


def test_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    bad = tmp_path / "missing-dir" / "aecho.log"
    result = run_aecho("serve", "--daemon", "--port", "0", "--log-file", str(bad))
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
    assert parse_pid(pidfile.read_text()) == srv.pid
    status = run_aecho("status", "--pidfile", str(pidfile))
    assert status.returncode == 0
    assert f"running, pid {srv.pid}, serving on 127.0.0.1:{srv.port}" in status.stdout
    assert srv.stop() == 0
    assert not pidfile.exists()


# -- a pidfile that lies, and links planted for it ---------------------------------------------


def test_stop_never_signals_a_pid_written_into_a_live_pidfile(daemons: Daemons) -> None:
    d = daemons.start()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        # Rewritten in place: the daemon still holds the lock, the file names a stranger.
        with open(d.pidfile, "r+") as f:
            f.write(f"{bystander.pid}\n")
            f.truncate()
        for command in ("stop", "status"):
            result = run_aecho(command, "--pidfile", str(d.pidfile))
            assert result.returncode == 1, result
            assert result.stdout == ""  # an error: one line on stderr, as every command's
            assert result.stderr.startswith("aecho: error: ")
            assert f"names pid {bystander.pid}, but pid {d.pid} holds its lock" in result.stderr
            assert result.stderr.count("\n") == 1
        assert bystander.poll() is None
        assert echo_once(d.port) == b"hello\x00\xff\n"
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_never_signals_a_lock_holder_that_is_not_run_aecho(tmp_path: Path) -> None:
    pidfile = tmp_path / "other.pid"
    # Another program holds the lock and wrote its own pid: a reused pid, say.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'%d\\n' % os.getpid())\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(pidfile),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        result = run_aecho("stop", "--pidfile", str(pidfile))
        assert result.returncode == 1
        assert f"pid {holder.pid} is not an aecho server" in result.stderr
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_pidfile_symlink_is_refused_and_its_target_never_created(tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    link = tmp_path / "aecho.pid"
    link.symlink_to(target)  # dangling
    for args in (["--daemon"], []):
        result = run_aecho("serve", "--port", "0", "--pidfile", str(link), *args)
        assert result.returncode == 1
        assert "symbolic link" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
        assert not target.exists()
        assert link.is_symlink()


def test_temporary_pidfile_names_cannot_be_planted(daemons: Daemons, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile = tmp_path / "aecho.pid"
    # Links for the predictable `PIDFILE.<pid>.tmp` names the daemon's pid could take.
    base = os.getpid()
    for pid in range(base, base + 400):
        (tmp_path / f"aecho.pid.{pid}.tmp").symlink_to(victim)
    d = daemons.start(pidfile=pidfile)
    assert victim.read_text() == "precious\n"
    assert pidfile.read_text() == f"{d.pid}\n"
    assert not pidfile.is_symlink()


def test_status_of_an_unreadable_or_starting_pidfile(tmp_path: Path) -> None:
    folder = tmp_path / "a-directory.pid"
    folder.mkdir()
    result = run_aecho("status", "--pidfile", str(folder))
    assert result.returncode == 4
    assert result.stderr.startswith("aecho: error: status unknown: cannot read pidfile")
    assert result.stdout == ""
    # Locked, nothing written yet: a server between taking the lock and writing its pid.
    starting = tmp_path / "starting.pid"
    fd = os.open(starting, os.O_RDWR | os.O_CREAT)
    try:
        import fcntl

        fcntl.lockf(fd, fcntl.LOCK_EX)
        result = run_aecho("status", "--pidfile", str(starting))
        assert result.returncode == 0
        assert "starting" in result.stdout
        # stop waits up to --timeout for the pid; none comes.
        stop = run_aecho("stop", "--pidfile", str(starting), "--timeout", "0.1")
        assert stop.returncode == 1
        assert f"by pid {os.getpid()}, a server still starting" in stop.stderr
        assert "wrote no pid within 0.1s; nothing was signalled" in stop.stderr
    finally:
        os.close(fd)


def test_daemon_on_a_unix_socket(daemons: Daemons, tmp_path: Path) -> None:
    path = tmp_path / "aecho.sock"
    pidfile = tmp_path / "unix.pid"
    daemons.pidfiles.add(pidfile)
    result = run_aecho("serve", "--daemon", "--unix", str(path), "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    m = re.match(rf"aecho serving on {re.escape(str(path))} \(pid (\d+), pidfile ", result.stdout)
    assert m, result.stdout
    daemons.track(int(m.group(1)))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(b"over unix\n")
        assert sock.recv(100) == b"over unix\n"
    assert run_aecho("stop", "--pidfile", str(pidfile)).returncode == 0
    assert not path.exists()
    assert not pidfile.exists()


def test_relative_tls_paths_work_in_a_daemon(daemons: Daemons, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "both.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    pidfile = tmp_path / "tls.pid"
    daemons.pidfiles.add(pidfile)
    result = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--daemon", "--port", "0", "--pidfile",
         "tls.pid", "--tls-cert", "both.pem", "--tls-key", "both.pem"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=CMD_TIMEOUT,
    )  # fmt: skip
    m = SERVING.match(result.stdout.strip())
    assert m, (result.stdout, result.stderr)
    daemons.track(int(m.group(2)))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"over tls\n")
        assert tls.recv(100) == b"over tls\n"


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-"], ids=["stdin", "stdout", "stderr"])
def test_a_daemon_started_with_a_std_descriptor_closed_serves_and_logs(
    daemons: Daemons, tmp_path: Path, closed: str
) -> None:
    """A closed 0, 1 or 2 must not become the log file's descriptor (which detaching then
    points at /dev/null), nor make detaching fail."""
    pidfile, log_file = tmp_path / "c.pid", tmp_path / "c.log"
    daemons.pidfiles.add(pidfile)
    serve = [sys.executable, "-m", "aecho", "serve", "--daemon", "--port", "0"]
    serve += ["--pidfile", str(pidfile), "--log-file", str(log_file)]
    result = subprocess.run(
        ["bash", "-c", 'exec "$@" ' + closed, "bash", *serve],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    status = run_aecho("status", "--pidfile", str(pidfile))
    assert status.returncode == 0, status.stdout
    port = int(re.findall(r"serving on 127\.0\.0\.1:(\d+)", status.stdout)[0])
    assert echo_once(port) == b"hello\x00\xff\n"
    assert f"listening on 127.0.0.1:{port}" in log_file.read_text()
    assert run_aecho("stop", "--pidfile", str(pidfile)).returncode == 0


def _close_stdout() -> None:
    os.close(1)


def test_a_server_started_with_stdout_closed_gives_its_children_a_stdout(
    serve_process: Callable[..., ServerProcess],
) -> None:
    """The /dev/null put on a closed 1 is inherited, as stdio is: the programs the server
    starts (pool workers, what a handler runs) find a descriptor 1 of their own."""
    srv = serve_process(preexec_fn=_close_stdout)
    with open(f"/proc/{srv.pid}/fdinfo/1", encoding="ascii") as f:
        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    assert not flags & 0o2000000, oct(flags)  # O_CLOEXEC
    assert os.readlink(f"/proc/{srv.pid}/fd/1") == os.devnull
    assert echo_once(srv.port) == b"hello\x00\xff\n"
    assert srv.stop() == 0
