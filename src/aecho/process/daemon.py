"""Detaching (double fork) and the readiness pipe between a daemon and its foreground.

``detach()`` returns only in the daemon.  The foreground process waits on a pipe
for the daemon's outcome (``ready ADDRESS``, ``error MESSAGE`` or ``stopped SIGNAL``)
and raises :class:`DaemonStarted` or a :class:`StartupError` with the daemon's own
one-line error, so every start-up failure reaches the operator's terminal.  A TERM or
INT to the foreground while it waits is passed on to the daemon, which stops before
it serves (``process.signals``).  Nothing here forks a process that is running an
event loop: the caller detaches before its loop exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import time
from collections.abc import Iterable

from aecho.config import ConfigError
from aecho.process.logs import log_file_fds, redirect_stdio
from aecho.process.pidfile import pid_alive, remove_if_stale
from aecho.process.signals import STOPS
from aecho.server.listeners import StartupError
from aecho.text import printable
from aecho.units import DURATION_FORMS, parse_duration

READY_TIMEOUT_ENV = "AECHO_READY_TIMEOUT"
DEFAULT_READY_TIMEOUT = 30.0
MAX_READY_TIMEOUT = 86400.0
# Past the ready timeout, how long the daemon's pid is still waited for, to stop it.
PID_GRACE_S = 5.0
POLL_S = 0.02


class DaemonStarted(Exception):
    """In the foreground process: the daemon serves.  The caller reports it and exits 0."""

    def __init__(self, address: str, pid: int, pidfile: str | None) -> None:
        super().__init__(address)
        self.address = address
        self.pid = pid
        self.pidfile = pidfile


class Readiness:
    """The daemon's end of the pipe: one line for the waiting foreground, then closed."""

    def __init__(self, fd: int = -1) -> None:
        self.fd = fd

    def _send(self, line: str) -> None:
        if self.fd < 0:
            return
        data = (printable(line) + "\n").encode("utf-8", errors="replace")
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.fd, data) :]

    def ready(self, address: str) -> None:
        self._send(f"ready {address}")
        self.close()

    def error(self, message: str) -> None:
        self._send(f"error {message}")
        self.close()

    def stopped(self, signame: str) -> None:
        """A TERM or INT came before it was ready: it stops without serving."""
        self._send(f"stopped {signame}")
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def detach(log_file: str | None, keep: Iterable[int], pidfile: str | None) -> Readiness:
    """Double fork into a new session; only the daemon returns.

    The daemon has working directory /, umask 022, stdio on /dev/null or the log
    file, and every inherited descriptor closed but ``keep`` and the log files.

    Raises:
        DaemonStarted: in the foreground process, once the daemon serves.
        StartupError: in the foreground process, when the daemon failed, vanished
            or was not ready in time; or when the first fork failed.
    """
    ready_r, ready_w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the process started with it closed
            stream.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        raise StartupError(f"cannot start the daemon: {exc.strerror}") from exc
    if pid > 0:
        os.close(ready_w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # the first child exits at once: reap it
        _await_readiness(ready_r, log_file, pidfile)
    readiness = Readiness(ready_w)
    try:
        os.close(ready_r)
        os.setsid()  # a new session: no controlling terminal, no terminal signals
        if os.fork() > 0:
            os._exit(0)  # the grandchild is not a session leader: it can never get a tty
    except OSError as exc:
        readiness.error(f"cannot detach: {exc.strerror}")
        os._exit(1)
    readiness._send(f"pid {os.getpid()}")
    try:
        os.chdir("/")
        os.umask(0o022)
        redirect_stdio(log_file)
        _close_inherited_fds({ready_w, *keep, *log_file_fds()})
    except OSError as exc:
        readiness.error(f"cannot detach: {exc.strerror}")
        os._exit(1)
    return readiness


def _close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor above 2 that is not in ``keep``."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        import resource

        fds = list(range(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def ready_timeout() -> float:
    """How long a daemon's foreground (and a supervisor, each serving process) waits for
    readiness: ``$AECHO_READY_TIMEOUT`` (a duration: ``90``, ``90s``, ``2m``), else 30 s.

    Raises:
        ConfigError: it is set to something that is not a duration above 0 and at most
            a day (a negative, zero, ``nan`` or ``inf`` timeout cannot be waited out).
    """
    text = os.environ.get(READY_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_READY_TIMEOUT
    try:
        value = parse_duration(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_READY_TIMEOUT:
        raise ConfigError(
            f"{READY_TIMEOUT_ENV}={text!r} is not a duration above 0 and at most "
            f"a day: use {DURATION_FORMS}, or unset it for {DEFAULT_READY_TIMEOUT:g}s"
        )
    return value


def _await_readiness(fd: int, log_file: str | None, pidfile: str | None) -> None:
    """In the foreground parent: relay the daemon's outcome.

    Past the ready timeout the daemon is killed, whatever it is doing: if its pid has
    not come through the pipe yet (a timeout of a few milliseconds), it is waited for
    up to PID_GRACE_S longer, so the daemon is never left running unreported.

    Raises:
        DaemonStarted: the daemon serves.
        StartupError: the daemon failed, vanished, or was not ready in time.
    """
    timeout = ready_timeout()
    deadline = time.monotonic() + timeout
    daemon_pid: int | None = None
    pidfd = -1  # held from the daemon's first word, so a reused pid is never killed
    buffer = b""
    see_log = f": see {log_file}" if log_file else ""
    stops = _Forwarded()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if daemon_pid is None:
                remaining += PID_GRACE_S  # past the deadline, only to learn whom to stop
            if remaining <= 0:
                break
            readable, _, _ = select.select([fd, stops.wake_r], [], [], remaining)
            if stops.wake_r in readable:
                stops.take()
            stops.forward(pidfd)
            if fd not in readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise StartupError(f"the daemon exited before it was ready{see_log}")
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                kind, _, rest = raw.decode("utf-8", errors="replace").partition(" ")
                if kind == "pid" and rest.isdigit():
                    daemon_pid = int(rest)
                    with contextlib.suppress(OSError):
                        pidfd = os.pidfd_open(daemon_pid)
                    stops.forward(pidfd)
                elif kind == "ready" and stops.sent:
                    raise StartupError(f"the daemon was stopped by {stops.sent} as it got ready")
                elif kind == "ready" and time.monotonic() < deadline:
                    raise DaemonStarted(rest, daemon_pid or 0, pidfile)
                elif kind == "error":
                    raise StartupError(rest)
                elif kind == "stopped":
                    raise StartupError(f"the daemon was stopped by {rest} before it was ready")
        if pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            wait_gone(daemon_pid or 0, 5.0)
    finally:
        stops.close()
        if pidfd >= 0:
            os.close(pidfd)
    if pidfile:
        remove_if_stale(pidfile)
    raise StartupError(
        f"the daemon (pid {daemon_pid}) was not ready within {timeout:g}s and was "
        f"stopped; set {READY_TIMEOUT_ENV} to wait longer"
        + (f", see {log_file}" if log_file else "")
    )


class _Forwarded:
    """TERM and INT to the waiting foreground, to be passed on to the daemon.

    They are held since ``aecho serve`` began (``process.signals``); here they are
    let in, through a wake-up pipe the readiness loop selects on.
    """

    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.pending: list[int] = []
        self.sent = ""  # the name of the first one passed on
        self.wakeup = signal.set_wakeup_fd(self.wake_w)
        self.handlers = {sig: signal.signal(sig, lambda *_: None) for sig in STOPS}
        self.mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)

    def take(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.pending += [n for n in os.read(self.wake_r, 64) if n in STOPS]

    def forward(self, pidfd: int) -> None:
        """Pass on what came, once the daemon is known (its pidfd)."""
        if pidfd < 0:
            return
        for signum in self.pending:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signum)
            self.sent = self.sent or signal.Signals(signum).name
        self.pending.clear()

    def close(self) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        signal.set_wakeup_fd(self.wakeup)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        os.close(self.wake_r)
        os.close(self.wake_w)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts as gone); False on timeout."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True
