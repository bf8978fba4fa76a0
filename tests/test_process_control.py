"""Process control under a careless operator: signals that come early, pidfiles that lie,
a ready timeout set to nonsense, a reload that fails.

Every test runs the real command in subprocesses, port 0.  A server is held at a chosen
point of its start-up by a gate (an audit hook loaded through ``sitecustomize``) that
says where it waits on the test's notify socket and goes on when the test writes to its
FIFO, so a signal lands in that window every time, with no sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aecho.config import ConfigError
from aecho.process.daemon import ready_timeout
from aecho.process.pidfile import Probe, pid_alive
from aecho.process.pidfile import probe as real_probe
from aecho.process.systemd import Notification, NotifyReceiver
from aecho.text import printable
from tests.conftest import (
    Daemons,
    ServerProcess,
    descendants,
    echo_once,
    free_port,
    round_trip,
    run_aecho,
    wait_until,
)
from tests.test_daemon import port_is_free

TIMEOUT = 30.0

GATE = """
import os, select, socket, sys

_SPEC = os.environ.get("AECHO_TEST_GATE", "")
_NOTIFY = os.environ.get("NOTIFY_SOCKET", "")
_DIR = os.environ.get("AECHO_TEST_GATE_DIR", "")
_passed = set()


def _gate(what):
    fifo = os.path.join(_DIR, "gate-%d" % os.getpid())
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    address = "\\0" + _NOTIFY[1:] if _NOTIFY.startswith("@") else _NOTIFY
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(("X_GATE=" + what).encode(), address)
    select.select([fd], [], [], 30)
    os.close(fd)


def _hook(event, args):
    if not _SPEC or os.getpid() in _passed:
        return
    kind, _, name = _SPEC.partition(":")
    key = args[0] if args else None
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    kinds = (("import", "import"), ("putenv", "os.putenv"), ("start", "aecho.start"))
    if (kind, event) in kinds and key == name:
        _passed.add(os.getpid())
        _gate(name)


sys.addaudithook(_hook)
"""


class Gated:
    """``aecho serve ARGS`` held at the gate ``spec`` (``import:MODULE``,
    ``putenv:NAME`` or ``start:STEP``, a step ``aecho serve`` raises the audit event
    ``aecho.start`` for) in every process that reaches it, until :meth:`release`."""

    def __init__(self, tmp_path: Path, spec: str, *args: str) -> None:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(GATE)
        self.dir = tmp_path
        self.notify = NotifyReceiver()
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        env = {
            **os.environ,
            **self.notify.env,
            "PYTHONPATH": path,
            "AECHO_TEST_GATE": spec,
            "AECHO_TEST_GATE_DIR": str(tmp_path),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aecho", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )

    def next_note(self) -> Notification:
        note = self.notify.receive(TIMEOUT)
        assert note is not None, "nothing from the server in time"
        return note

    def at_gate(self) -> int:
        """Wait until a process stops at the gate; its pid."""
        note = self.next_note()
        assert "X_GATE" in note.fields, note.fields
        assert note.pid is not None
        return note.pid

    def release(self, pid: int) -> None:
        """Let ``pid`` go on (nothing to do if a signal has ended it at the gate)."""
        try:
            fd = os.open(self.dir / f"gate-{pid}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads the FIFO any more
            return
        with contextlib.suppress(OSError):
            os.write(fd, b"go")
        os.close(fd)

    def wait_ready(self) -> Notification:
        note = self.notify.wait_ready(TIMEOUT, lambda: self.proc.poll() is not None)
        assert note is not None, f"not ready; exit status {self.proc.poll()}"
        return note

    def close(self) -> str:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        _, err = self.proc.communicate(timeout=TIMEOUT)
        self.notify.close()
        return err


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Callable[..., Gated]]:
    """Start :class:`Gated` servers; every one is killed at teardown."""
    started: list[Gated] = []

    def start(spec: str, *args: str) -> Gated:
        started.append(Gated(tmp_path, spec, *args))
        return started[-1]

    yield start
    for server in started:
        server.close()


# -- signals that come before their handlers --------------------------------------------------


def blocked_signals(pid: int) -> int:
    """The signal mask of ``pid``'s main thread, as /proc shows it."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        line = next(x for x in f if x.startswith("SigBlk:"))
    return int(line.split()[1], 16)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN])
def test_an_operator_signal_during_start_up_waits_for_its_handler(
    gated: Callable[..., Gated], tmp_path: Path, sig: signal.Signals, loop: str
) -> None:
    log = tmp_path / "aecho.log"
    server = gated("import:aecho.process.serve", "--log-file", str(log), "--loop", loop)
    pid = server.at_gate()
    os.kill(pid, sig)
    server.release(pid)
    ready = server.wait_ready()
    assert server.proc.poll() is None
    assert echo_once(ready.port) == b"hello\x00\xff\n"
    assert blocked_signals(pid) == 0  # held only until the handlers were in
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    assert f"{sig.name}: " in log.read_text()


def test_usr1_to_a_starting_serving_process_of_workers_waits_for_its_handler(
    gated: Callable[..., Gated], tmp_path: Path
) -> None:
    log = tmp_path / "aecho.log"
    server = gated("putenv:NOTIFY_SOCKET", "--workers", "2", "--log-file", str(log))
    children = [server.at_gate(), server.at_gate()]
    # Log rotation while the serving processes start: the supervisor passes USR1 on.
    server.proc.send_signal(signal.SIGUSR1)
    for child in children:
        os.kill(child, signal.SIGUSR1)
        server.release(child)
    ready = server.wait_ready()
    assert echo_once(ready.port) == b"hello\x00\xff\n"
    for pid in [server.proc.pid, *children]:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "Z"
        assert blocked_signals(pid) == 0
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    text = log.read_text()
    assert "killed by" not in text, text
    assert text.count("SIGUSR1: reopened log file") >= 2, text


# -- the daemon's ready timeout ------------------------------------------------------------------

NONSENSE = ["-1", "0", "nan", "inf", "-inf", "1e400", "2d", "soon", "25h", "1\n2"]


@pytest.mark.parametrize("value", NONSENSE)
def test_a_nonsensical_ready_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("AECHO_READY_TIMEOUT", value)
    with pytest.raises(ConfigError, match=r"^AECHO_READY_TIMEOUT="):
        ready_timeout()


@pytest.mark.parametrize("value", ["-1", "nan", "0", "inf", "soon"])
@pytest.mark.parametrize("mode", [("--daemon",), ("--workers", "2")], ids=["daemon", "workers"])
def test_a_nonsensical_ready_timeout_starts_nothing(
    daemons: Daemons, tmp_path: Path, value: str, mode: tuple[str, ...]
) -> None:
    pidfile = tmp_path / "t.pid"
    daemons.pidfiles.add(pidfile)
    port = free_port()
    result = run_aecho(
        "serve", *mode, "--port", str(port), "--pidfile", str(pidfile),
        env={"AECHO_READY_TIMEOUT": value}, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("aecho: error: AECHO_READY_TIMEOUT="), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not pidfile.exists()
    assert port_is_free(port)


def test_a_daemon_that_times_out_before_its_pid_is_known_is_still_stopped(
    daemons: Daemons, tmp_path: Path
) -> None:
    """1 ms runs out before the daemon's pid comes through the pipe: it is still stopped,
    not left serving behind an error that says it was.  (Its handler never finishes
    importing, so it cannot be ready however slowly the foreground runs.)"""
    (tmp_path / "never_imported.py").write_text("import time\ntime.sleep(120)\n")
    pidfile = tmp_path / "t.pid"
    daemons.pidfiles.add(pidfile)
    port = free_port()
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    result = run_aecho(
        "serve", "--daemon", "--port", str(port), "--pidfile", str(pidfile),
        "--handler", "never_imported:handle",
        env={"AECHO_READY_TIMEOUT": "1ms", "PYTHONPATH": path}, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    m = re.match(
        r"aecho: error: the daemon \(pid (\d+)\) was not ready within 0.001s", result.stderr
    )
    assert m, result.stderr
    daemons.track(int(m.group(1)))
    assert not pid_alive(int(m.group(1)))
    assert not pidfile.exists()
    assert wait_until(lambda: port_is_free(port), 10)


# -- pidfiles that lie -----------------------------------------------------------------------

IMPOSSIBLE = ["0", "1", "-1", "99999999999999999999", "4194305", "+7", "0x10", "abc", "\u0663"]


@pytest.mark.parametrize("content", IMPOSSIBLE)
def test_a_pidfile_without_a_possible_pid_is_stale_and_taken_over(
    daemons: Daemons, tmp_path: Path, content: str
) -> None:
    pidfile = tmp_path / "lies.pid"
    pidfile.write_text(content + "\n")
    for command, code in (("status", 3), ("stop", 0)):
        result = run_aecho(command, "--pidfile", str(pidfile), timeout=TIMEOUT)
        assert result.returncode == code, result
        assert result.stdout == f"aecho: not running (stale pidfile {pidfile}: it holds " + (
            f"{content!r}, not a pid a server can have)\n"
        )
    d = daemons.start(pidfile=pidfile)
    assert pidfile.read_text() == f"{d.pid}\n"


@pytest.mark.parametrize("content", ["0", "-1", "1", "99999999999999999999"])
def test_a_live_pidfile_rewritten_to_an_impossible_pid_is_never_signalled(
    daemons: Daemons, content: str
) -> None:
    d = daemons.start()
    # Rewritten in place: the daemon still holds the lock, the file names no process.
    with open(d.pidfile, "r+") as f:
        f.write(content + "\n")
        f.truncate()
    for command in ("stop", "status"):
        result = run_aecho(command, "--pidfile", str(d.pidfile), timeout=TIMEOUT)
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert result.stderr == (
            f"aecho: error: pidfile {d.pidfile} does not name the server that holds it: it "
            f"holds {content!r}, not a pid a server can have (pid {d.pid} holds its lock)"
            + ("; nothing was signalled" if command == "stop" else "")
            + "\n"
        )
    assert pid_alive(d.pid)
    assert echo_once(d.port) == b"hello\x00\xff\n"


# -- text from outside stays on one line -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, ünïcode, 'quotes'", "plain text, ünïcode, 'quotes'"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x1b[2J\x7f\x85\u2028", "\\x00\\x1b[2J\\x7f\\x85\\u2028"),
        ("bad \udcff byte", "bad \\udcff byte"),
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown


ESCAPED = "first line\\nsecond line\\r\\x1b[31mred\\u2028end"


@pytest.mark.parametrize("offload", ["inline", "process"])
def test_a_handler_error_with_newlines_is_one_log_record_and_one_reply_line(
    serve_process: Callable[..., ServerProcess], offload: str
) -> None:
    srv = serve_process(
        "--framing", "line", "--handler", "tests.handlers_for_tests:multiline",
        "--offload", offload, "--pool-size", "1",
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
        got = round_trip(sock, b"ml now\nok\n", lines=2)
    assert got == f"ERR ValueError: {ESCAPED}\nok\n".encode()
    assert wait_until(lambda: "handler tests.handlers_for_tests:multiline" in srv.output)
    assert srv.stop() == 0
    records = [x for x in srv.output.splitlines() if "handlers_for_tests:multiline failed" in x]
    assert len(records) == 1, srv.output
    assert records[0].endswith(f"ValueError: {ESCAPED}"), records[0]
    assert not any(x.startswith("second line") for x in srv.output.splitlines())


def test_a_pidfile_path_with_a_newline_is_one_error_line(tmp_path: Path) -> None:
    folder = tmp_path / "a\nb\x1b[2J.pid"
    folder.mkdir()
    result = run_aecho("stop", "--pidfile", str(folder), timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "a\\nb\\x1b[2J.pid" in result.stderr
    serve = run_aecho("serve", "--port", "0", "--pidfile", str(folder), timeout=TIMEOUT)
    assert serve.returncode == 1
    assert serve.stderr.count("\n") == 1, serve.stderr
    assert "a\\nb\\x1b[2J.pid" in serve.stderr


# -- a reload that cannot finish -------------------------------------------------------------


def test_an_abandoned_reload_says_so_in_one_line_and_the_old_processes_serve_on(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    flag = tmp_path / "broken.flag"
    (tmp_path / "breaks_on_reload.py").write_text(
        "import os\n"
        f"if os.path.exists({str(flag)!r}):\n"
        "    raise RuntimeError('new config\\nis bad')\n"
        "\n"
        "def handle(data):\n"
        "    return data\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    srv = serve_process(
        "--workers", "2", "--handler", "breaks_on_reload:handle", env={"PYTHONPATH": path}
    )
    flag.write_text("")
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload abandoned" in srv.output, TIMEOUT), srv.output
    assert echo_once(srv.port) == b"hello\x00\xff\n"
    assert srv.proc.poll() is None
    assert srv.stop() == 0
    lines = srv.output.splitlines()
    abandoned = [x for x in lines if "reload abandoned" in x]
    assert len(abandoned) == 1, srv.output
    assert abandoned[0].endswith(
        "cannot import handler module 'breaks_on_reload': RuntimeError: new config\\nis bad; "
        "the old serving processes keep serving"
    ), abandoned[0]
    assert re.search(r"reload abandoned: new serving process 1 did not start: ", abandoned[0])
    assert not any(x.startswith("is bad") for x in lines)


# -- aecho stop's exit status (0 gone or not running, 1 nothing stopped, 2 usage) -------------


def test_stop_exit_status(daemons: Daemons, tmp_path: Path) -> None:
    folder = tmp_path / "a-directory.pid"
    folder.mkdir()
    unreadable = run_aecho("stop", "--pidfile", str(folder), timeout=TIMEOUT)
    assert unreadable.returncode == 1, unreadable
    assert unreadable.stderr.startswith("aecho: error: cannot read pidfile ")
    for usage in ([], ["--pidfile", str(folder), "--port", "7007"]):
        result = run_aecho("stop", *usage, timeout=TIMEOUT)
        assert result.returncode == 2, result
    none = tmp_path / "none.pid"
    absent = run_aecho("stop", "--pidfile", str(none), timeout=TIMEOUT)
    assert (absent.returncode, absent.stdout) == (0, f"aecho: not running (no pidfile at {none})\n")
    d = daemons.start()
    stopped = run_aecho("stop", "--pidfile", str(d.pidfile), timeout=TIMEOUT)
    assert (stopped.returncode, stopped.stdout) == (0, f"aecho: stopped (pid {d.pid})\n")
    assert not pid_alive(d.pid)


def test_the_descriptor_limit_warning_comes_once_from_the_supervisor(
    serve_process: Callable[..., ServerProcess],
) -> None:
    srv = serve_process("--workers", "3", "--max-connections", "100000000")
    assert srv.stop() == 0
    warnings = [x for x in srv.output.splitlines() if "does not fit in the file descriptor" in x]
    assert len(warnings) == 1, srv.output
    assert " aecho.process: " in warnings[0]  # the supervisor's, not a serving process's


# -- the start window: TERM and INT, stop and status before the server serves -----------------

MODES = {"single": (), "workers": ("--workers", "2")}


def pending_signals(pid: int) -> int:
    """The signals waiting to be delivered to ``pid`` (its own and its process's)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("SigPnd", "ShdPnd")))
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def is_pending(pid: int, sig: signal.Signals) -> bool:
    try:
        return bool(pending_signals(pid) & (1 << (sig - 1)))
    except OSError:
        return False


WITH_UNIX = {
    **MODES,
    "unix": ("--unix", "SOCK"),
    "unix-workers": ("--unix", "SOCK", "--workers", "2"),
}


@pytest.mark.parametrize("mode", WITH_UNIX.values(), ids=WITH_UNIX.keys())
@pytest.mark.parametrize("step", ["pidfile-locked", "pidfile-written"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_starting_stops_cleanly(
    gated: Callable[..., Gated],
    tmp_path: Path,
    sig: signal.Signals,
    step: str,
    mode: tuple[str, ...],
) -> None:
    """TERM or INT before the server serves: exit 0, no pidfile, no process left, one line."""
    log, pidfile = tmp_path / "aecho.log", tmp_path / "t.pid"
    sock = tmp_path / "t.sock"
    mode = tuple(str(sock) if arg == "SOCK" else arg for arg in mode)
    args = ("--pidfile", str(pidfile), "--log-file", str(log), *mode)
    server = gated(f"start:{step}", *args)
    pid = server.at_gate()
    assert pid == server.proc.pid
    os.kill(pid, sig)
    server.release(pid)
    assert server.proc.wait(TIMEOUT) == 0, server.close()
    assert server.close() == ""
    assert not pidfile.exists()
    assert not sock.exists()
    assert not descendants(pid)
    text = log.read_text()
    assert f"{sig.name} while starting: stopping before serving" in text, text
    assert "listening on" not in text, text


def test_a_stop_signal_while_serving_processes_start_stops_them_all(
    gated: Callable[..., Gated], tmp_path: Path
) -> None:
    log, pidfile = tmp_path / "aecho.log", tmp_path / "t.pid"
    args = ("--workers", "2", "--pidfile", str(pidfile), "--log-file", str(log))
    server = gated("putenv:NOTIFY_SOCKET", *args)
    children = [server.at_gate(), server.at_gate()]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0, server.close()
    assert not pidfile.exists()
    assert not any(pid_alive(child) for child in children)
    assert "SIGTERM while starting: stopping before serving" in log.read_text()


@pytest.mark.parametrize("step", ["pidfile-locked", "pidfile-written"])
def test_a_daemon_stopped_while_starting_cleans_up_and_says_so(
    gated: Callable[..., Gated], daemons: Daemons, tmp_path: Path, step: str
) -> None:
    pidfile = tmp_path / "t.pid"
    daemons.pidfiles.add(pidfile)
    server = gated(f"start:{step}", "--daemon", "--pidfile", str(pidfile))
    daemon = server.at_gate()
    daemons.track(daemon)
    assert daemon != server.proc.pid
    os.kill(daemon, signal.SIGTERM)
    server.release(daemon)
    assert server.proc.wait(TIMEOUT) == 1
    err = server.close()
    assert err == "aecho: error: the daemon was stopped by SIGTERM before it was ready\n", err
    assert wait_until(lambda: not pid_alive(daemon), TIMEOUT)
    assert not pidfile.exists()


def test_ctrl_c_while_a_daemon_starts_stops_the_daemon(
    gated: Callable[..., Gated], daemons: Daemons, tmp_path: Path
) -> None:
    """The foreground passes INT on: no daemon is left serving behind an interrupted start."""
    pidfile = tmp_path / "t.pid"
    daemons.pidfiles.add(pidfile)
    server = gated("start:pidfile-written", "--daemon", "--pidfile", str(pidfile))
    daemon = server.at_gate()
    daemons.track(daemon)
    server.proc.send_signal(signal.SIGINT)
    # The daemon holds it until it has its handlers; pending is the proof it was passed on.
    assert wait_until(lambda: is_pending(daemon, signal.SIGINT), TIMEOUT)
    server.release(daemon)
    assert server.proc.wait(TIMEOUT) == 1
    err = server.close()
    assert err == "aecho: error: the daemon was stopped by SIGINT before it was ready\n", err
    assert wait_until(lambda: not pid_alive(daemon), TIMEOUT)
    assert not pidfile.exists()


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_stop_and_status_recognise_the_server_as_soon_as_its_pidfile_names_it(
    gated: Callable[..., Gated], tmp_path: Path, mode: tuple[str, ...]
) -> None:
    pidfile = tmp_path / "t.pid"
    server = gated("start:pidfile-written", "--pidfile", str(pidfile), *mode)
    pid = server.at_gate()
    assert pidfile.read_text() == f"{pid}\n"
    status = run_aecho("status", "--pidfile", str(pidfile), timeout=TIMEOUT)
    assert status.returncode == 0, status
    assert status.stdout.startswith(f"aecho: running, pid {pid}, serving on 127.0.0.1:"), status
    stop = subprocess.Popen(
        [sys.executable, "-m", "aecho", "stop", "--pidfile", str(pidfile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: stop.poll() is not None or is_pending(pid, signal.SIGTERM), 30)
        server.release(pid)
        out, err = stop.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            stop.kill()
        stop.wait(TIMEOUT)
    assert (stop.returncode, out, err) == (0, f"aecho: stopped (pid {pid})\n", "")
    assert server.proc.wait(TIMEOUT) == 0
    assert not pidfile.exists()


def test_stop_waits_for_the_pid_of_a_server_that_has_locked_its_pidfile(
    gated: Callable[..., Gated], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locked, still empty: ``stop`` waits for the pid instead of giving up."""
    from aecho.process import control

    pidfile = tmp_path / "t.pid"
    server = gated("start:pidfile-locked", "--pidfile", str(pidfile))
    pid = server.at_gate()
    assert (pidfile.read_text(), real_probe(str(pidfile)).state) == ("", "starting")
    seen_starting = threading.Event()

    def probe(path: str) -> Probe:
        found = real_probe(path)
        if found.state == "starting":
            seen_starting.set()
        return found

    monkeypatch.setattr(control, "probe", probe)
    outcome: list[control.Outcome] = []
    stopper = threading.Thread(target=lambda: outcome.append(control.stop(str(pidfile), TIMEOUT)))
    stopper.start()
    try:
        assert seen_starting.wait(TIMEOUT)
        server.release(pid)
    finally:
        stopper.join(2 * TIMEOUT)
    assert outcome == [control.Outcome(0, f"stopped (pid {pid})")]
    assert server.proc.wait(TIMEOUT) == 0
    assert not pidfile.exists()


def test_stop_gives_up_on_a_pidfile_locked_and_empty_past_its_timeout(
    gated: Callable[..., Gated], tmp_path: Path
) -> None:
    pidfile = tmp_path / "t.pid"
    server = gated("start:pidfile-locked", "--pidfile", str(pidfile))
    pid = server.at_gate()
    stop = run_aecho("stop", "--pidfile", str(pidfile), "--timeout", "0.2", timeout=TIMEOUT)
    assert stop.returncode == 1, stop
    assert stop.stderr == (
        f"aecho: error: pidfile {pidfile} is locked by pid {pid}, a server still starting "
        "that wrote no pid within 0.2s; nothing was signalled\n"
    )
    assert not is_pending(pid, signal.SIGTERM)
    server.release(pid)
    assert server.wait_ready() is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0


def test_a_stop_signal_while_the_pool_starts_stops_it_and_never_says_ready(
    gated: Callable[..., Gated], tmp_path: Path
) -> None:
    log = tmp_path / "aecho.log"
    args = ("--offload", "process", "--pool-size", "2", "--log-file", str(log))
    server = gated("import:multiprocessing.forkserver", *args)
    pid = server.at_gate()
    assert pid == server.proc.pid
    os.kill(pid, signal.SIGTERM)
    server.release(pid)
    # The forkserver imports the module too, and waits at the gate in its turn.
    notes = []
    deadline = time.monotonic() + TIMEOUT
    while server.proc.poll() is None and time.monotonic() < deadline:
        note = server.notify.receive(0.5)
        if note is not None and note.pid is not None and "X_GATE" in note.fields:
            server.release(note.pid)
        notes.append(note)
    assert server.proc.wait(TIMEOUT) == 0, server.close()
    assert not descendants(pid)
    notes += [server.notify.receive(0) for _ in range(8)]
    assert not any(note.ready for note in notes if note is not None), notes
    text = log.read_text()
    assert "SIGTERM while starting: stopping before serving" in text, text
