"""One serving process: its event loop, its Server and its signals.

Signals: TERM/INT stop gracefully, a second one forces the stop (every connection is
cut, but the pidfile, the socket file and the pool are still cleaned up), a third
exits at once; USR1 reopens the log file; HUP has nothing to reload in a single
process (the supervisor of ``--workers`` handles it).  These signals are held from the
start of ``aecho serve`` until the handlers are in place (``process.signals``); a TERM
or INT that came meanwhile stops the process before it serves: nothing is started, the
readiness pipe says so, and the exit status is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable

from aecho.address import format_address
from aecho.config import ConfigError, ServerConfig
from aecho.loops import run as run_loop
from aecho.offload.handlers import HandlerError
from aecho.process.daemon import Readiness
from aecho.process.logs import reopen_log_files
from aecho.process.pidfile import Pidfile
from aecho.process.signals import release, take_stop
from aecho.process.systemd import LISTEN_FIELD, notify
from aecho.server.limits import Limits
from aecho.server.listeners import StartupError
from aecho.server.server import Server
from aecho.text import plural

log = logging.getLogger("aecho.process")

# Descriptors a serving process needs besides its connections: listeners, log,
# pidfile, the loop's own, pool pipes.
FD_SLACK = 64


def log_fd_limit(limit: tuple[int, int], max_connections: int) -> None:
    """Say which descriptor limit the server runs with; warn when the connections cannot fit."""
    now, before = limit
    raised = f" (raised from {before})" if now != before else ""
    log.info("file descriptor limit %d%s", now, raised)
    if now != resource.RLIM_INFINITY and max_connections + FD_SLACK > now:
        log.warning(
            "--max-connections %d does not fit in the file descriptor limit %d: at most "
            "about %s can be served; raise the hard limit (ulimit -Hn, "
            "LimitNOFILE=) or lower --max-connections",
            max_connections,
            now,
            plural(max(0, now - FD_SLACK), "connection"),
        )


def describe(exc: BaseException, config: ServerConfig) -> str:
    """The one line a failed start-up shows."""
    if isinstance(exc, StartupError | HandlerError | ConfigError):
        return str(exc)
    hint = (
        f" (details in {config.log_file})" if config.log_file else " (use --log-file for details)"
    )
    return f"the server failed while starting: {type(exc).__name__}: {exc}{hint}"


def announce_ready(server: Server) -> str:
    """Tell a service manager (or whoever set NOTIFY_SOCKET) that we serve; the address."""
    address = ", ".join(format_address(a) for a in server.addresses)
    listen = " ".join(format_address(a) for a in server.addresses)
    notify(f"READY=1\nSTATUS=serving on {address}\nMAINPID={os.getpid()}\n{LISTEN_FIELD}={listen}")
    return address


def run_server(
    config: ServerConfig,
    sockets: list[socket.socket],
    readiness: Readiness | None = None,
    pidfile: Pidfile | None = None,
    fd_limit: tuple[int, int] | None = None,
    limits: Limits | None = None,
    on_ready: Callable[[Server], None] | None = None,
    supervised: bool = False,
) -> int:
    """One serving process: the event loop, the server and its signals.

    ``on_ready`` runs on the loop once the server serves; ``supervised`` marks a
    serving process of ``--workers`` (HUP is its supervisor's business).  Returns 0
    after a graceful stop, 128 + the signal's number after a forced one.

    Raises:
        StartupError, aecho.offload.handlers.HandlerError, ConfigError: start-up failed.
    """

    def ready(server: Server) -> None:
        if fd_limit is not None:
            log_fd_limit(fd_limit, config.max_connections)
        address = announce_ready(server)
        if readiness is not None:
            readiness.ready(address)
        if on_ready is not None:
            on_ready(server)

    def on_stopping() -> None:
        notify("STOPPING=1")

    server = Server(config, sockets, on_stopping=on_stopping, limits=limits)
    signals = _Signals(server, config, pidfile, supervised, readiness)
    return run_loop(signals.run(ready), config.loop)


class _Signals:
    """The signal handlers of one serving process, installed on its loop."""

    def __init__(
        self,
        server: Server,
        config: ServerConfig,
        pidfile: Pidfile | None,
        supervised: bool,
        readiness: Readiness | None,
    ) -> None:
        self.server = server
        self.config = config
        self.pidfile = pidfile
        self.supervised = supervised
        self.readiness = readiness
        self.serving = False
        self.stops = 0
        self.forced_by: int | None = None

    async def run(self, on_ready: Callable[[Server], None]) -> int:
        if (early := take_stop()) is not None:
            # Nothing is started: no pool, no accepting; the listeners close at exit.
            self._on_stop(early)
            self._last_resort()
            return 0
        loop = asyncio.get_running_loop()
        # Handlers go in before the server announces itself: whoever waits for that
        # may signal at once, and must get a graceful stop, not the default death.
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
            installed.append(sig)
        loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        installed.append(signal.SIGUSR1)
        # TTIN/TTOU would stop a foreground process (their default); they mean "one
        # serving process more or less", which only a supervisor can do.
        for sig in (signal.SIGTTIN, signal.SIGTTOU):
            loop.add_signal_handler(sig, self._on_scale, sig)
            installed.append(sig)
        # A foreground server without a log file keeps SIGHUP's default (a closed
        # terminal ends it); otherwise there is no terminal and it must not kill.
        if self.config.log_file is not None or self.config.daemon or self.supervised:
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            installed.append(signal.SIGHUP)
        release()  # what came while ``aecho serve`` started is handled now
        try:
            await self.server.run(lambda server: self._ready(server, on_ready))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        return 0 if self.forced_by is None else 128 + self.forced_by

    def _ready(self, server: Server, on_ready: Callable[[Server], None]) -> None:
        if not self.stops:  # one stopped while starting never says that it serves
            self.serving = True
            on_ready(server)

    def _on_stop(self, sig: signal.Signals) -> None:
        self.stops += 1
        if self.stops == 1 and not self.serving:
            log.info("%s while starting: stopping before serving", sig.name)
            if self.readiness is not None:
                self.readiness.stopped(sig.name)
            self.server.request_stop()
        elif self.stops == 1:
            log.info("%s: stopping (grace %.3gs)", sig.name, self.config.graceful_timeout)
            self.server.request_stop()
        elif self.stops == 2:
            log.warning("%s again: cutting every connection and stopping now", sig.name)
            self.forced_by = int(sig)
            self.server.force_stop()
        else:
            log.warning("%s a third time: exiting at once", sig.name)
            self._last_resort()
            os._exit(128 + int(sig))

    def _last_resort(self) -> None:
        """Leave no pidfile or socket file behind, even when exiting without cleanup."""
        if self.pidfile is not None:
            self.pidfile.remove()
        if self.config.unix:
            with contextlib.suppress(OSError):
                os.unlink(self.config.unix)

    def _on_usr1(self) -> None:
        if reopen_log_files(redirect=self.config.daemon):
            log.info("SIGUSR1: reopened log file %s", self.config.log_file)
        else:
            log.info("SIGUSR1: no log file to reopen")

    def _on_scale(self, sig: signal.Signals) -> None:
        log.info("%s: a single serving process cannot change its number (use --workers)", sig.name)

    def _on_hup(self) -> None:
        log.info("SIGHUP: a single serving process has nothing to reload; SIGUSR1 reopens logs")
