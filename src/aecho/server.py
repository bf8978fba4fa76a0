"""The server: listeners, lifecycle (start -> serve -> graceful stop), limits.

Binding is synchronous and separate (:func:`bind_listeners`) so that a daemon
can bind in the foreground, report errors on the terminal, and only then
detach and create its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable
from typing import Any

from aecho.address import format_address
from aecho.config import (
    DEFAULT_UNIX_MODE,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    Framing,
    ProxyMode,
    ServerConfig,
    parse_networks,
)
from aecho.connection import Connection, PooledConnection, ProxyPrelude, RawEchoConnection
from aecho.handlers import load_handler
from aecho.offload import InlineProcessor, Processor
from aecho.process.systemd import notify as sd_notify
from aecho.stats import Stats

log = logging.getLogger("aecho.server")

# While stopping, connections are swept this often and closed once quiet.
SHUTDOWN_SWEEP_S = 0.05
# Out-of-descriptor warnings are repeated at most this often.
EMFILE_LOG_INTERVAL_S = 10.0


class StartupError(RuntimeError):
    """The server cannot start; str() is the one-line message for the operator."""


def _bind_error(where: str, exc: OSError) -> StartupError:
    hints = {
        errno.EADDRINUSE: "address already in use: is another server on that port? "
        "Choose another --port, or --port 0 for any free port",
        errno.EADDRNOTAVAIL: "address not available on this machine: check --host",
        errno.EACCES: "permission denied: ports below 1024 need privileges; use a higher --port",
    }
    reason = hints.get(exc.errno or 0, exc.strerror or str(exc))
    return StartupError(f"cannot listen on {where}: {reason}")


def _unix_bind_error(path: str, exc: OSError) -> StartupError:
    directory = os.path.dirname(os.path.abspath(path))
    if exc.errno == errno.ENOENT and not os.path.isdir(directory):
        reason = f"directory {directory} does not exist"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        reason = f"cannot create a socket in {directory}: {exc.strerror}"
    elif exc.errno is None and "too long" in str(exc):
        reason = "path too long for a Unix socket (at most 107 bytes)"
    else:
        reason = exc.strerror or str(exc)
    return StartupError(f"cannot listen on {path}: {reason}; choose another --unix path")


def _bind_unix(path: str, backlog: int, mode: int = DEFAULT_UNIX_MODE) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        st_mode = os.stat(path).st_mode
        if not stat.S_ISSOCK(st_mode):
            raise StartupError(
                f"cannot listen on {path}: it exists and is not a socket; "
                "remove it or choose another --unix path"
            )
        if stat.S_ISSOCK(st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nothing listens there any more
            else:
                raise StartupError(f"cannot listen on {path}: a server is already listening there")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): no peer can connect while the mode is still the umask's.
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _unix_bind_error(path, exc) from exc
    sock.setblocking(False)
    return sock


def bind_listeners(config: ServerConfig, _attempt: int = 0) -> list[socket.socket]:
    """Create, bind and listen on every socket the configuration asks for.

    A host name that resolves to several addresses gets one listener each; with
    ``--port 0`` they all share the port the first one was given.  ``--udp``
    adds a UDP socket on each TCP listener's address and port.

    Raises:
        StartupError: the host does not resolve, or a bind or listen fails.
    """
    backlog = config.effective_backlog
    if config.unix:
        return [_bind_unix(config.unix, backlog, config.unix_mode)]
    try:
        infos = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {config.host!r}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    port = config.port
    try:
        for family, type_, proto, _, addr in infos:
            key = (family, addr[0])
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            where = format_address((addr[0], port))
            try:
                sock.bind((addr[0], port, *addr[2:]))
                sock.listen(backlog)
            except OSError as exc:
                raise _bind_error(where, exc) from exc
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if config.udp:
        try:
            sockets += _bind_udp_twins(sockets)
        except StartupError:
            for sock in sockets:
                sock.close()
            if config.port == 0 and _attempt < 5:
                # The free TCP port was taken for UDP: pick another pair.
                return bind_listeners(config, _attempt + 1)
            raise
    return sockets


def _bind_udp_twins(tcp_sockets: list[socket.socket]) -> list[socket.socket]:
    """A UDP socket on the address and port of each TCP listener.

    Raises:
        StartupError: a bind failed (all UDP sockets made so far are closed).
    """
    from aecho.udp import bind_udp

    made: list[socket.socket] = []
    for tcp in tcp_sockets:
        addr = tcp.getsockname()
        try:
            made.append(bind_udp(tcp.family, addr))
        except OSError as exc:
            for sock in made:
                sock.close()
            raise _bind_error(f"udp {format_address(addr)}", exc) from exc
    return made


def make_processor(config: ServerConfig) -> Processor:
    """Resolve the handler and build the processor the configuration asks for.

    Raises:
        aecho.handlers.HandlerError: the handler cannot be loaded.
    """
    handler = load_handler(config.handler)
    if config.offload.value == "process":
        from aecho.offload import PoolProcessor

        return PoolProcessor(handler, config.handler, config)
    return InlineProcessor(handler, config.handler)


class Server:
    """Serves every connection on one event loop.

    Lifecycle: ``await start()`` (listeners serving), then ``await serve()`` which
    returns after :meth:`request_stop` and a graceful shutdown.
    """

    def __init__(
        self,
        config: ServerConfig,
        sockets: list[socket.socket] | None = None,
        processor: Processor | None = None,
    ) -> None:
        self.config = config
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.write_high = WRITE_HIGH_WATER
        self.write_low = WRITE_LOW_WATER
        self._sockets = sockets
        self._processor = processor
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._factory: Callable[[], Connection] = self._choose_factory()
        self.started_at = time.time()
        self._emfile_logged_at = -EMFILE_LOG_INTERVAL_S
        self.proxy_networks = parse_networks(config.proxy_allow_from)
        if config.proxy_protocol is not ProxyMode.off:
            inner = self._factory
            self._factory = lambda: ProxyPrelude(self, inner)
        self._per_ip: dict[str, int] = {}
        self._ssl: ssl.SSLContext | None = None
        self._udp: list[asyncio.BaseTransport] = []
        self.metrics: Any = None

    @property
    def processor(self) -> Processor:
        assert self._processor is not None, "server not started"
        return self._processor

    def _choose_factory(self) -> Callable[[], Connection]:
        cfg = self.config
        if cfg.framing is Framing.raw and cfg.handler == "echo" and cfg.offload.value == "inline":
            return lambda: RawEchoConnection(self)
        if cfg.offload.value == "process":
            return lambda: PooledConnection(self)
        return lambda: Connection(self)

    @property
    def addresses(self) -> list[object]:
        """The bound addresses (``(host, port, ...)`` tuples or Unix paths)."""
        return [sock.getsockname() for srv in self._servers for sock in srv.sockets]

    @property
    def port(self) -> int:
        """The TCP port actually bound (meaningful with ``--port 0``)."""
        for addr in self.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise RuntimeError("no TCP listener")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind (unless sockets were given), start the processor and begin accepting.

        Raises:
            StartupError: binding failed.
            aecho.handlers.HandlerError: the handler cannot be loaded.
        """
        cfg = self.config
        if cfg.tls_cert and cfg.tls_key and self._ssl is None:
            from aecho.tls import server_context

            self._ssl = server_context(cfg.tls_cert, cfg.tls_key)
        if self._processor is None:
            self._processor = make_processor(self.config)
        self._processor.stats = self.stats
        if self._sockets is None:
            self._sockets = bind_listeners(self.config)
        if cfg.metrics_port is not None:
            await self._start_metrics(cfg.metrics_port)
        await self._processor.start()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        for sock in self._sockets:
            if sock.type == socket.SOCK_DGRAM:
                from aecho.udp import UdpEcho

                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(UdpEcho, self.stats, sock), sock=sock
                )
                self._udp.append(transport)
                log.info("answering UDP on %s", format_address(sock.getsockname()))
                continue
            srv = await loop.create_server(
                self._factory, sock=sock, backlog=self.config.effective_backlog, ssl=self._ssl
            )
            self._servers.append(srv)
        for addr in self.addresses:
            log.info("listening on %s", format_address(addr))
        if self._ssl is not None:
            log.info("TLS on, certificate %s", cfg.tls_cert)
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="aecho-idle-sweeper")

    async def _start_metrics(self, port: int) -> None:
        """Serve Prometheus metrics on 127.0.0.1:``port``.

        Raises:
            StartupError: the port cannot be bound or prometheus_client is missing.
        """
        try:
            from aecho.metrics import MetricsServer
        except ImportError:
            self._close_sockets()
            raise StartupError(
                "--metrics-port needs prometheus_client: pip install 'aecho[metrics]'"
            ) from None
        metrics = MetricsServer(self)
        try:
            await metrics.start(port)
        except OSError as exc:
            self._close_sockets()
            raise _bind_error(f"metrics port 127.0.0.1:{port}", exc) from exc
        self.metrics = metrics
        log.info("metrics on http://127.0.0.1:%d/metrics", metrics.port)

    def _close_sockets(self) -> None:
        for sock in self._sockets or ():
            sock.close()

    def request_stop(self) -> None:
        """Begin a graceful stop (idempotent; safe from signal handlers)."""
        self._stop.set()

    async def serve(self) -> None:
        """Serve until :meth:`request_stop`, then stop gracefully."""
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let owed replies go out within the grace period, close the rest."""
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        sd_notify("STOPPING=1")
        for srv in self._servers:
            srv.close()
        for transport in self._udp:
            transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        open_at_stop = len(self.connections)
        deadline = time.monotonic() + self.config.graceful_timeout
        # A connection is closed once it has been quiet for a whole sweep: nothing
        # arrived, nothing is owed.  Peers mid-exchange get their replies first.
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.active:
                    conn.active = False
                elif conn.quiet:
                    conn.close()
            await asyncio.sleep(SHUTDOWN_SWEEP_S)
        forced = len(self.connections)
        for conn in list(self.connections):
            conn.abort()
        remaining = max(0.0, deadline - time.monotonic())
        await self.processor.close(remaining)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if self.config.unix:
            with contextlib.suppress(OSError):
                os.unlink(self.config.unix)
        if self.metrics is not None:
            await self.metrics.close()
        log.info(
            "stopped: %d connections open at stop, %d cut at the grace deadline",
            open_at_stop,
            forced,
        )

    async def run(self, on_ready: Callable[[Server], None] | None = None) -> None:
        """Start, install SIGTERM/SIGINT handlers, serve until told to stop.

        A second SIGINT (or SIGTERM) during the graceful stop exits at once.

        Raises:
            StartupError: binding failed.
            aecho.handlers.HandlerError: the handler cannot be loaded.
        """
        loop = asyncio.get_running_loop()
        # Handlers go in before start() logs `listening on`: whoever waits for that line
        # may signal at once, and must get a graceful stop, not the default death.
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        # SIGHUP reopens the log file.  A foreground server without one keeps the default
        # (a closed terminal ends it); a daemon has no terminal and must not die of it.
        reopen = self.config.log_file is not None or self.config.daemon
        if reopen:
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            await self.start()
            if on_ready is not None:
                on_ready(self)
            await self.serve()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if reopen:
                loop.remove_signal_handler(signal.SIGHUP)

    def _on_hangup(self) -> None:
        from aecho.daemon import reopen_log_files

        if self.config.log_file is None:
            log.info("SIGHUP: no log file to reopen")
            return
        reopen_log_files(redirect_stdio=self.config.daemon)
        log.info("SIGHUP: reopened log file %s", self.config.log_file)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("%s again: exiting now without waiting", sig.name)
            for conn in list(self.connections):
                conn.abort()
            os._exit(130 if sig == signal.SIGINT else 143)
        log.info("%s: stopping (grace %.3gs)", sig.name, self.config.graceful_timeout)
        self.request_stop()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """One line per loop-level error; the traceback only at debug level."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            now = time.monotonic()
            if now - self._emfile_logged_at > EMFILE_LOG_INTERVAL_S:
                self._emfile_logged_at = now
                log.warning(
                    "out of file descriptors with %d connections open: accepting paused "
                    "until some close (raise the limit with `ulimit -n`)",
                    len(self.connections),
                )
            return
        log.error("%s%s", context.get("message", "event loop error"), f": {exc!r}" if exc else "")
        if isinstance(exc, BaseException):
            log.debug("traceback", exc_info=exc)

    # -- connection registry -----------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False when it must be refused."""
        if self._stopping or len(self.connections) >= self.config.max_connections:
            self.stats.refused += 1
            log.debug("refusing %s: %d connections open", conn.peer, len(self.connections))
            return False
        per_ip = self.config.max_connections_per_ip
        if per_ip and isinstance(conn.peer, tuple):
            ip = conn.peer[0]
            count = self._per_ip.get(ip, 0)
            if count >= per_ip:
                self.stats.refused_per_ip += 1
                log.debug("refusing %s: %d connections open from %s", conn.peer, count, ip)
                return False
            self._per_ip[ip] = count + 1
        self.stats.accepted += 1
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.remove(conn)
        if self.config.max_connections_per_ip and isinstance(conn.peer, tuple):
            ip = conn.peer[0]
            count = self._per_ip.get(ip, 0) - 1
            if count > 0:
                self._per_ip[ip] = count
            else:
                self._per_ip.pop(ip, None)

    def hold(self, conn: Connection) -> bool:
        """Register a connection still reading its PROXY header; False when refused.

        It counts toward ``--max-connections`` (and is swept at shutdown) but is
        only admitted, per-IP limit included, once its real client is known.
        """
        if self._stopping or len(self.connections) >= self.config.max_connections:
            self.stats.refused += 1
            return False
        self.connections.add(conn)
        return True

    def proxy_trusted(self, peer: object) -> bool:
        """Whether ``peer`` may (and must) send a PROXY header: in --proxy-allow-from.

        Unix socket peers are local processes and always trusted.
        """
        if not isinstance(peer, tuple):
            return True
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(ip in net for net in self.proxy_networks)

    async def _sweep_idle(self) -> None:
        timeout = self.config.idle_timeout
        if timeout <= 0:
            return
        # Four sweeps per timeout: a connection is closed between 1x and 1.25x the
        # timeout after its last read, with no per-message timer work.
        interval = max(timeout / 4, 0.01)
        limit = 4
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.connections):
                if conn.active:
                    conn.active = False
                    conn.idle_ticks = 0
                else:
                    conn.idle_ticks += 1
                    if conn.idle_ticks >= limit:
                        log.debug("closing idle connection %s", conn.peer)
                        conn.close()
