"""``aecho serve`` as a process: the order of start-up, and the signals of a serving process.

The order is fixed so that every start-up error reaches the operator's terminal:
resolve paths -> raise the descriptor limit -> lock (or check) the pidfile -> bind
(or adopt systemd's sockets) -> with ``--daemon``: detach, lock the pidfile -> write
the pidfile -> only then the event loop.  Signals: TERM/INT stop gracefully, a second
one forces the stop (cleanup still runs), a third exits at once; USR1 reopens the log
file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable

from aecho.address import format_address
from aecho.config import ConfigError, ServerConfig
from aecho.loops import loop_factory
from aecho.loops import run as run_loop
from aecho.offload.handlers import HandlerError
from aecho.process.daemon import Readiness, detach
from aecho.process.logs import reopen_log_files
from aecho.process.pidfile import Pidfile, check_free, default_pidfile
from aecho.process.systemd import LISTEN_FIELD, notify
from aecho.process.titles import server_title, set_process_title
from aecho.server.listeners import StartupError, open_listeners
from aecho.server.server import Server
from aecho.text import plural

log = logging.getLogger("aecho.process")

# Descriptors a serving process needs besides its connections: listeners, log,
# pidfile, the loop's own, pool pipes.
FD_SLACK = 64


def bound_port(sockets: list[socket.socket], config: ServerConfig) -> int:
    """The TCP port really bound (so two ``--port 0`` daemons never share a pidfile)."""
    for sock in sockets:
        addr = sock.getsockname()
        if isinstance(addr, tuple):
            return int(addr[1])
    return config.port


def _absolute_paths(config: ServerConfig) -> ServerConfig:
    """Paths made absolute, and handlers imported from here: a daemon changes to /."""

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    return dataclasses.replace(
        config,
        pidfile=absolute(config.pidfile),
        log_file=absolute(config.log_file),
        unix=absolute(config.unix),
        tls_cert=absolute(config.tls_cert),
        tls_key=absolute(config.tls_key),
        handler_dir=absolute(config.handler_dir or os.getcwd()),
    )


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one, as nginx and Go's runtime do.

    Returns the limit now and the one before.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.debug("cannot raise the descriptor limit to %d: %s", target, exc)
        return soft, soft
    return target, soft


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


def serve(config: ServerConfig) -> int:
    """Run ``aecho serve`` until it is stopped; return the exit status.

    0 after a graceful stop; 128 + the signal's number after a forced one.  With
    ``--daemon`` the foreground process gets :class:`aecho.process.daemon.DaemonStarted`.

    Raises:
        StartupError: the pidfile is held, binding failed, or the server failed
            before it was ready (a daemon's own error included).
        aecho.offload.handlers.HandlerError: the handler cannot be loaded.
        ConfigError: the requested event loop is not available, TLS files unusable.
        aecho.process.daemon.DaemonStarted: in the foreground process of a daemon.
    """
    config = _absolute_paths(config)
    loop_factory(config.loop)  # an unavailable --loop is reported here, not by the daemon
    limit = raise_fd_limit()
    pidfile: Pidfile | None = None
    if config.pidfile and not config.daemon:
        pidfile = Pidfile.acquire(config.pidfile)
    elif config.pidfile:
        check_free(config.pidfile)
    try:
        sockets = open_listeners(config)
    except BaseException:
        if pidfile is not None:
            pidfile.remove()
        raise
    readiness = Readiness()
    try:
        if config.daemon:
            if not config.pidfile:
                config = dataclasses.replace(
                    config, pidfile=default_pidfile(bound_port(sockets, config), config.unix)
                )
                check_free(config.pidfile or "")
            keep = [s.fileno() for s in sockets]
            readiness = detach(config.log_file, keep, config.pidfile)
            pidfile = Pidfile.acquire(config.pidfile or "")
        if pidfile is not None:
            pidfile.write(os.getpid())
        address = " ".join(format_address(s.getsockname()) for s in sockets)
        set_process_title(server_title(address))
        return run_server(config, sockets, readiness, pidfile, limit)
    except BaseException as exc:
        if readiness.fd >= 0 and not isinstance(exc, SystemExit):
            log.debug("start-up failed", exc_info=exc)
            readiness.error(describe(exc, config))
        raise
    finally:
        readiness.close()
        if pidfile is not None:
            pidfile.remove()


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
) -> int:
    """One serving process: the event loop, the server and its signals.

    Returns 0 after a graceful stop, 128 + the signal's number after a forced one.

    Raises:
        StartupError, aecho.offload.handlers.HandlerError, ConfigError: start-up failed.
    """

    def on_ready(server: Server) -> None:
        if fd_limit is not None:
            log_fd_limit(fd_limit, config.max_connections)
        address = announce_ready(server)
        if readiness is not None:
            readiness.ready(address)

    def on_stopping() -> None:
        notify("STOPPING=1")

    server = Server(config, sockets, on_stopping=on_stopping)
    signals = _Signals(server, config, pidfile)
    return run_loop(signals.run(on_ready), config.loop)


class _Signals:
    """The signal handlers of one serving process, installed on its loop."""

    def __init__(self, server: Server, config: ServerConfig, pidfile: Pidfile | None) -> None:
        self.server = server
        self.config = config
        self.pidfile = pidfile
        self.stops = 0
        self.forced_by: int | None = None

    async def run(self, on_ready: Callable[[Server], None]) -> int:
        loop = asyncio.get_running_loop()
        # Handlers go in before the server announces itself: whoever waits for that
        # may signal at once, and must get a graceful stop, not the default death.
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
            installed.append(sig)
        loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        installed.append(signal.SIGUSR1)
        # A foreground server without a log file keeps SIGHUP's default (a closed
        # terminal ends it); otherwise there is no terminal and it must not kill.
        if self.config.log_file is not None or self.config.daemon:
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            installed.append(signal.SIGHUP)
        try:
            await self.server.run(on_ready)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        return 0 if self.forced_by is None else 128 + self.forced_by

    def _on_stop(self, sig: signal.Signals) -> None:
        self.stops += 1
        if self.stops == 1:
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

    def _on_hup(self) -> None:
        log.info("SIGHUP: a single serving process has nothing to reload; SIGUSR1 reopens logs")
