"""Serving processes of ``--workers``: how the supervisor forks one, and what runs in it.

The supervisor runs no event loop and no threads, so a fork of it is clean: the
child starts its own loop (and its own offload pool) from scratch.  A child lives
in a process group of its own, so a terminal's Ctrl-C reaches only the supervisor,
which then stops every child exactly once; it dies with the supervisor (a death
signal, SIGTERM: a graceful stop); it tells the supervisor that it serves through
``NOTIFY_SOCKET`` (READY=1, as it would tell systemd), or why it could not
(``X_AECHO_ERROR``); and it answers ``stats`` requests on a socketpair with a JSON
snapshot of its counters, which the supervisor sums for ``/metrics``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aecho.address import format_address
from aecho.config import ServerConfig
from aecho.process.logs import FORMAT, log_file_fds
from aecho.process.serving import describe, run_server
from aecho.process.signals import HELD
from aecho.process.systemd import notify
from aecho.process.titles import server_title, set_process_title
from aecho.server.limits import SharedLimits, SharedTable
from aecho.server.server import Server
from aecho.server.stats import Stats
from aecho.text import printable

log = logging.getLogger("aecho.supervisor")

ERROR_FIELD = "X_AECHO_ERROR"
_PR_SET_PDEATHSIG = 1
# Signals the supervisor handles; a child starts with their defaults.
SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)


@dataclass(eq=False)
class Child:
    """One serving process, as the supervisor sees it."""

    pid: int
    index: int  # the worker number, 1-based
    row: int  # its row in the shared limits table
    control: socket.socket  # the supervisor's end of the stats channel
    born: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting, ready, stopping
    error: str = ""
    stats: Stats | None = None  # the last snapshot it sent
    _buf: bytes = b""

    def tell(self, line: bytes) -> bool:
        """Send the child one line of the channel; False if it has gone."""
        try:
            self.control.send(line + b"\n")
        except OSError:
            return False
        return True

    def ask_stats(self) -> bool:
        """Ask for a snapshot (the answer arrives on :attr:`control`); False if gone."""
        return self.tell(b"stats")

    def read_stats(self) -> bool:
        """Take what arrived on :attr:`control`; True when a whole snapshot came."""
        got = False
        while True:
            try:
                chunk = self.control.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                self.stats = Stats.from_dict(json.loads(line))
                got = True
            except (ValueError, TypeError, KeyError):
                log.debug("worker %d sent unreadable stats", self.index)
        return got


def spawn(
    config: ServerConfig,
    sockets: list[socket.socket],
    index: int,
    workers: int,
    row: int,
    table: SharedTable,
    notify_path: str,
) -> Child:
    """Fork serving process number ``index`` on ``sockets``; the supervisor gets its Child.

    Raises:
        OSError: the fork or the socketpair failed.
    """
    ours, theirs = socket.socketpair()
    supervisor = os.getpid()
    # Until the child has put its own handlers in, a signal must not run the
    # supervisor's (whose wake-up socket it shares) nor take its default action.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid == 0:  # the child: never returns
        ours.detach()
        _serve_in_child(
            config, sockets, table, theirs, (index, workers, row, notify_path, supervisor)
        )
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    theirs.close()
    ours.setblocking(False)
    return Child(pid=pid, index=index, row=row, control=ours)


def _serve_in_child(
    config: ServerConfig,
    sockets: list[socket.socket],
    table: SharedTable,
    control: socket.socket,
    where: tuple[int, int, int, str, int],
) -> None:
    index, workers, row, notify_path, supervisor = where
    code = 1
    try:
        _become_child(sockets, control, supervisor)
        os.environ["NOTIFY_SOCKET"] = notify_path
        address = " ".join(format_address(s.getsockname()) for s in sockets)
        set_process_title(server_title(address, index, workers))
        tagged = logging.Formatter(FORMAT.replace("%(name)s", f"%(name)s[{index}]"))
        for handler in logging.getLogger().handlers:
            handler.setFormatter(tagged)
        limits = SharedLimits(config.max_connections, config.max_connections_per_ip, table, row)
        # The supervisor owns what outlives one serving process: the metrics port, the
        # pidfile, the Unix socket's file (a retiring process must not unlink it).
        child_config = dataclasses.replace(
            config, metrics_port=None, daemon=False, pidfile=None, unix=None
        )
        channel = StatsChannel(
            control, lambda n: set_process_title(server_title(address, index, n))
        )

        def serving(server: Server) -> None:
            # From now on the loop handles TERM: the supervisor's death stops it gracefully.
            _die_with_parent(signal.SIGTERM)
            channel.attach(server)

        code = run_server(child_config, sockets, limits=limits, on_ready=serving, supervised=True)
        channel.send()  # the last word: the supervisor's totals stay exact
    except BaseException as exc:  # whatever it is, it must not unwind into the supervisor
        with contextlib.suppress(BaseException):
            log.debug("serving process failed", exc_info=exc)
            line = printable(describe(exc, config))
            notify(f"{ERROR_FIELD}={line}")
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(code)


def _become_child(sockets: list[socket.socket], control: socket.socket, supervisor: int) -> None:
    """Leave the supervisor's world: signals, process group, descriptors, its death."""
    signal.set_wakeup_fd(-1)
    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # TERM and INT take their default action until the loop handles them; the operator
    # signals stay held until then (``process.signals``).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SUPERVISOR_SIGNALS) - HELD)
    os.setpgid(0, 0)
    # Until it serves, a serving process cannot act on TERM: its loop may be held by
    # start-up (a handler's import, say) for as long as that takes.  Killed outright if
    # its supervisor dies by then, it can never be left holding the port unsupervised.
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before the death signal was armed
        os._exit(0)
    keep = {0, 1, 2, control.fileno(), *(s.fileno() for s in sockets), *log_file_fds()}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


class StatsChannel:
    """The child's end of its channel with the supervisor: a JSON snapshot line per
    ``stats`` request, and a new title on ``workers N`` (their number changed)."""

    def __init__(self, control: socket.socket, retitle: Callable[[int], None]) -> None:
        self.control = control
        self.retitle = retitle
        self.server: Server | None = None
        self._buf = b""

    def attach(self, server: Server) -> None:
        """Serve requests on the server's loop (called once it serves)."""
        import asyncio

        self.server = server
        self.control.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = self.control.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.control.fileno())
                return
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                if line == b"stats":
                    self.send()
                elif line.startswith(b"workers ") and line[8:].isdigit():
                    self.retitle(int(line[8:]))

        loop.add_reader(self.control.fileno(), readable)

    def send(self) -> None:
        """One snapshot line now (blocking briefly: it is a few hundred bytes)."""
        if self.server is None:
            return
        line = json.dumps(self.server.snapshot().to_dict()).encode() + b"\n"
        with contextlib.suppress(OSError):
            self.control.settimeout(1.0)
            self.control.sendall(line)
            self.control.setblocking(False)
