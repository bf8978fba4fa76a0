"""``aecho serve`` as a process: the order of start-up, then one serving process or a
supervisor of several.

The order is fixed so that every start-up error reaches the operator's terminal:
resolve paths -> raise the descriptor limit -> lock (or check) the pidfile -> bind
(or adopt systemd's sockets) -> with ``--daemon``: detach, lock the pidfile -> set the
process title -> write the pidfile -> only then an event loop (``process.serving``) or,
with ``--workers``, the supervisor that forks the serving processes
(``process.supervisor``).  The title comes before the pid: ``stop`` and ``status``
check it, so a pidfile never names a process that does not yet look like aecho.

TERM and INT are held until the handlers are in (``process.signals``).  The steps raise the audit
event ``aecho.start`` with the step just done (``pidfile-locked``, ``pidfile-written``),
where a test can hold the start to signal it at a known point.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import socket
import sys

from aecho.address import format_address
from aecho.config import ServerConfig
from aecho.loops import loop_factory
from aecho.process.daemon import Readiness, detach, ready_timeout
from aecho.process.pidfile import Pidfile, check_free, default_pidfile
from aecho.process.serving import describe, run_server
from aecho.process.titles import server_title, set_process_title, supervisor_title
from aecho.server.listeners import open_listeners

log = logging.getLogger("aecho.process")


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


def serve(config: ServerConfig) -> int:
    """Run ``aecho serve`` until it is stopped; return the exit status.

    0 after a graceful stop; 128 + the signal's number after a forced one.  With
    ``--daemon`` the foreground process gets :class:`aecho.process.daemon.DaemonStarted`.

    Raises:
        StartupError: the pidfile is held, binding failed, or the server failed
            before it was ready (a daemon's own error included).
        aecho.offload.handlers.HandlerError: the handler cannot be loaded.
        ConfigError: the requested event loop is not available, TLS files unusable,
            ``$AECHO_READY_TIMEOUT`` is not a duration (with ``--daemon`` or ``--workers``).
        aecho.process.daemon.DaemonStarted: in the foreground process of a daemon.
    """
    config = _absolute_paths(config)
    loop_factory(config.loop)  # an unavailable --loop is reported here, not by the daemon
    if config.daemon or config.workers > 1:
        ready_timeout()  # a nonsensical $AECHO_READY_TIMEOUT is refused before anything starts
    limit = raise_fd_limit()
    pidfile: Pidfile | None = None
    if config.pidfile and not config.daemon:
        pidfile = Pidfile.acquire(config.pidfile)
        sys.audit("aecho.start", "pidfile-locked")
    elif config.pidfile:
        check_free(config.pidfile)
    try:
        sockets = open_listeners(config, reuse_port=config.workers > 1 and config.reuse_port)
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
            sys.audit("aecho.start", "pidfile-locked")
        address = " ".join(format_address(s.getsockname()) for s in sockets)
        if config.workers > 1:
            set_process_title(supervisor_title(address, config.workers))
        else:
            set_process_title(server_title(address))
        if pidfile is not None:
            pidfile.write(os.getpid())
            sys.audit("aecho.start", "pidfile-written")
        if config.workers > 1:
            from aecho.process.supervisor import Supervisor

            return Supervisor(config, sockets, readiness, pidfile, limit).run()
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
