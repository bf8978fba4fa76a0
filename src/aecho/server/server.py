"""The server: one event loop serving every connection (start -> serve -> graceful stop).

It takes listening sockets made beforehand (``server.listeners``), chooses one
connection class for its configuration, keeps the connection registry and its
limits, sweeps idle connections, and stops gracefully.  It announces what the
process around it needs to know (ready, stopping) through callbacks and imports
nothing above it: signals, pidfiles and daemons are ``aecho.process``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from aecho.address import format_address
from aecho.config import Framing, Offload, ProxyMode, ServerConfig, parse_networks
from aecho.offload.handlers import load_handler
from aecho.offload.pool import Pool
from aecho.server.budget import Budget
from aecho.server.connection import (
    Connection,
    InlineConnection,
    RawEchoConnection,
    Tracked,
)
from aecho.server.handshake import TlsListener
from aecho.server.listeners import StartupError, bind_error, bind_listeners
from aecho.server.pooled import PooledConnection
from aecho.server.prelude import Prelude
from aecho.server.proxy import ProxyPrelude
from aecho.server.stats import Stats

log = logging.getLogger("aecho.server")

# While stopping, connections are swept this often and closed once quiet.
SHUTDOWN_SWEEP_S = 0.05
# Out-of-descriptor warnings are repeated at most this often.
EMFILE_LOG_INTERVAL_S = 10.0
# How often a uvloop server checks whether it is out of descriptors.
FD_WATCH_INTERVAL_S = 0.5


class Server:
    """Serves every connection on one event loop.

    Lifecycle: ``await start()`` (listeners serving), then ``await serve()`` which
    returns after :meth:`request_stop` and a graceful shutdown.  ``on_stopping`` is
    called once when a graceful stop begins.
    """

    def __init__(
        self,
        config: ServerConfig,
        sockets: list[socket.socket] | None = None,
        on_stopping: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._stats = Stats()
        self.connections: set[Connection] = set()
        # Connections still in their prelude (PROXY header, TLS handshake): counted,
        # not yet served.  The value: the address counted against the per-IP limit.
        self.preludes: dict[Prelude, str | None] = {}
        self.pool: Pool | None = None
        # Bytes every pooled connection together holds for the pool.
        self.budget = Budget(config.pool_budget)
        self._on_stopping = on_stopping
        self._sockets = sockets
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._forced = False
        self._sweeper: asyncio.Task[None] | None = None
        self._factory: Callable[[], Any] = lambda: None
        self._emfile_logged_at = -EMFILE_LOG_INTERVAL_S
        self._proxy_networks = parse_networks(config.proxy_allow_from)
        self._per_ip: dict[str, int] = {}
        self._ssl: ssl.SSLContext | None = None
        self._udp: list[asyncio.BaseTransport] = []
        self._tls: list[TlsListener] = []
        self._fd_watch: asyncio.Task[None] | None = None
        self._metrics: Any = None

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def stats(self) -> Stats:
        return self._stats

    def _choose_factory(self) -> Callable[[], Any]:
        """The connection class for this configuration, chosen once.

        Raises:
            aecho.offload.handlers.HandlerError: the handler cannot be loaded.
        """
        cfg = self._config
        handler = load_handler(cfg.handler)
        factory: Callable[[], Connection]
        if self.pool is not None:
            pool, budget = self.pool, self.budget
            factory = lambda: PooledConnection(self, pool, budget)  # noqa: E731
        elif cfg.framing is Framing.raw and cfg.handler == "echo":
            factory = lambda: RawEchoConnection(self)  # noqa: E731
        else:
            factory = lambda: InlineConnection(self, handler)  # noqa: E731
        if cfg.proxy_protocol is not ProxyMode.off:
            return lambda: ProxyPrelude(self, factory)
        return factory

    @property
    def addresses(self) -> list[object]:
        """The bound addresses (``(host, port, ...)`` tuples or Unix paths)."""
        socks = [sock for srv in self._servers for sock in srv.sockets]
        socks += [t.sock for t in self._tls if t.sock.fileno() >= 0]
        return [sock.getsockname() for sock in socks]

    @property
    def port(self) -> int:
        """The TCP port actually bound (meaningful with ``--port 0``)."""
        for addr in self.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise RuntimeError("no TCP listener")

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint really bound, or None without one."""
        return self._metrics.port if self._metrics is not None else None

    def snapshot(self) -> Stats:
        """The counters now, open connections' bytes included (what metrics show)."""
        snap = self._stats.copy()
        snap.connections_open = len(self.connections)
        for conn in list(self.connections):
            snap.bytes_in += conn.rx
            snap.bytes_out += conn.bytes_out
        return snap

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind (unless sockets were given), start the pool and begin accepting.

        Raises:
            StartupError: binding failed.
            aecho.handlers.HandlerError: the handler cannot be loaded.
            aecho.config.ConfigError: the TLS files cannot be used.
        """
        cfg = self._config
        if cfg.tls_cert and cfg.tls_key and self._ssl is None:
            from aecho.tls import server_context

            self._ssl = server_context(cfg.tls_cert, cfg.tls_key)
        if cfg.offload is Offload.process:
            self.pool = Pool(cfg.handler, cfg.effective_pool_size, cfg.handler_timeout, self._stats)
        self._factory = self._choose_factory()
        if self._sockets is None:
            self._sockets = bind_listeners(cfg)
        if cfg.metrics_port is not None:
            await self._start_metrics(cfg.metrics_port)
        if self.pool is not None:
            await self.pool.start()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        for sock in self._sockets:
            if sock.type == socket.SOCK_DGRAM:
                from aecho.server.udp import UdpEcho

                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(UdpEcho, self._stats, sock), sock=sock
                )
                self._udp.append(transport)
                log.info("answering UDP on %s", format_address(sock.getsockname()))
                continue
            if self._ssl is not None:
                # TLS starts after the peer is counted (server.handshake).
                tls = TlsListener(sock, self, self._factory, self._ssl, self._out_of_descriptors)
                tls.start()
                self._tls.append(tls)
                continue
            srv = await loop.create_server(self._factory, sock=sock, backlog=cfg.effective_backlog)
            self._servers.append(srv)
        for addr in self.addresses:
            log.info("listening on %s", format_address(addr))
        if self._ssl is not None:
            log.info("TLS on, certificate %s", cfg.tls_cert)
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="aecho-idle-sweeper")
        if self._servers and type(loop).__module__.startswith("uvloop"):
            fd = self._servers[0].sockets[0].fileno()
            self._fd_watch = asyncio.create_task(self._watch_descriptors(fd), name="aecho-fd-watch")

    async def _start_metrics(self, port: int) -> None:
        """Serve Prometheus metrics on 127.0.0.1:``port``.

        Raises:
            StartupError: the port cannot be bound or prometheus_client is missing.
        """
        try:
            from aecho.server.metrics import MetricsServer
        except ImportError:
            self._close_sockets()
            raise StartupError(
                "--metrics-port needs prometheus_client: pip install 'aecho[metrics]'"
            ) from None
        metrics = MetricsServer(lambda: [({}, self.snapshot())])
        try:
            await metrics.start(port)
        except OSError as exc:
            self._close_sockets()
            raise bind_error(f"metrics port 127.0.0.1:{port}", exc) from exc
        self._metrics = metrics
        log.info("metrics on http://127.0.0.1:%d/metrics", metrics.port)

    def _close_sockets(self) -> None:
        for sock in self._sockets or ():
            sock.close()

    def request_stop(self) -> None:
        """Begin a graceful stop (idempotent; safe from signal handlers)."""
        self._stop.set()

    def force_stop(self) -> None:
        """Cut every connection now and end the graceful stop; cleanup still runs."""
        self._forced = True
        self._stop.set()
        for conn in self._tracked():
            conn.abort()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self) -> None:
        """Serve until :meth:`request_stop`, then stop gracefully."""
        await self._stop.wait()
        await self.shutdown()

    def _tracked(self) -> list[Tracked]:
        return [*self.connections, *self.preludes]

    async def shutdown(self) -> None:
        """Stop accepting, let owed replies go out within the grace period, close the rest."""
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        if self._on_stopping is not None:
            self._on_stopping()
        self._stop_listening()
        for task in (self._sweeper, self._fd_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        open_at_stop = len(self.connections) + len(self.preludes)
        for member in list(self.connections):
            member.drain()
        deadline = time.monotonic() + self._config.graceful_timeout
        # A connection is closed once it has been quiet for a whole sweep: nothing
        # arrived, nothing is owed.  Peers mid-exchange get their replies first.
        while self._tracked() and time.monotonic() < deadline and not self._forced:
            for conn in self._tracked():
                if conn.active:
                    conn.active = False
                elif conn.quiet:
                    conn.close()
            await asyncio.sleep(SHUTDOWN_SWEEP_S)
        cut = self._tracked()
        for conn in cut:
            conn.abort()
        if self.pool is not None:
            remaining = 0.0 if self._forced else max(0.0, deadline - time.monotonic())
            await self.pool.close(remaining)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if self._config.unix:
            with contextlib.suppress(OSError):
                os.unlink(self._config.unix)
        if self._metrics is not None:
            await self._metrics.close()
        log.info(
            "stopped: %d connections open at stop, %d cut %s",
            open_at_stop,
            len(cut),
            "by a forced stop" if self._forced else "at the grace deadline",
        )

    async def run(self, on_ready: Callable[[Server], None] | None = None) -> None:
        """Start, tell ``on_ready``, serve until told to stop.

        Raises:
            StartupError: binding failed.
            aecho.handlers.HandlerError: the handler cannot be loaded.
        """
        try:
            await self.start()
        except BaseException:
            await self._abandon()
            raise
        if on_ready is not None:
            on_ready(self)
        await self.serve()

    def _stop_listening(self) -> None:
        for srv in self._servers:
            srv.close()
        for tls in self._tls:
            tls.close()
        for transport in self._udp:
            transport.close()

    async def _abandon(self) -> None:
        """Start-up failed half-way: release what it took (listeners, workers)."""
        self._stop_listening()
        self._close_sockets()
        for task in (self._sweeper, self._fd_watch):
            if task is not None:
                task.cancel()
        if self.pool is not None:
            await self.pool.close(0.0)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """One line per loop-level error; the traceback only at debug level."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self._out_of_descriptors()
            return
        log.error("%s%s", context.get("message", "event loop error"), f": {exc!r}" if exc else "")
        if isinstance(exc, BaseException):
            log.debug("traceback", exc_info=exc)

    async def _watch_descriptors(self, fd: int) -> None:
        """uvloop (libuv) meets EMFILE on accept by accepting and closing at once, and
        tells no one: look for the condition itself, twice a second, by dup()ing ``fd``."""
        while True:
            await asyncio.sleep(FD_WATCH_INTERVAL_S)
            try:
                os.close(os.dup(fd))
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._out_of_descriptors()

    def _out_of_descriptors(self) -> None:
        """Say so, at most once per EMFILE_LOG_INTERVAL_S."""
        now = time.monotonic()
        if now - self._emfile_logged_at > EMFILE_LOG_INTERVAL_S:
            self._emfile_logged_at = now
            log.warning(
                "out of file descriptors with %d connections open: new connections "
                "wait or are refused until some close (raise the limit with `ulimit -n`)",
                len(self.connections),
            )

    # -- connection registry -----------------------------------------------------------------

    def _full(self) -> bool:
        if self._stopping or len(self.connections) + len(self.preludes) >= (
            self._config.max_connections
        ):
            self._stats.refused += 1
            return True
        return False

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False when it must be refused."""
        if self._full():
            log.debug(
                "refusing %s: %d connections open",
                format_address(conn.peer),
                len(self.connections),
            )
            return False
        if not self._count_ip(conn.peer)[0]:
            return False
        self._stats.accepted += 1
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.remove(conn)
        if self._config.max_connections_per_ip and isinstance(conn.peer, tuple):
            self._uncount_ip(conn.peer[0])

    def _count_ip(self, peer: object) -> tuple[bool, str | None]:
        """Count ``peer`` against the per-IP limit: whether it is admitted, and the
        address counted (None without a limit to count against)."""
        per_ip = self._config.max_connections_per_ip
        if not per_ip or not isinstance(peer, tuple):
            return True, None
        ip = str(peer[0])
        count = self._per_ip.get(ip, 0)
        if count >= per_ip:
            self._stats.refused_per_ip += 1
            log.debug("refusing %s: %d connections open from %s", format_address(peer), count, ip)
            return False, None
        self._per_ip[ip] = count + 1
        return True, ip

    def _uncount_ip(self, ip: str) -> None:
        count = self._per_ip.get(ip, 0) - 1
        if count > 0:
            self._per_ip[ip] = count
        else:
            self._per_ip.pop(ip, None)

    def hold(self, prelude: Prelude, per_ip: bool = False) -> bool:
        """Count a connection still in its prelude; False when refused.

        It counts toward ``--max-connections`` (and is swept at shutdown) from
        accept.  The per-IP limit applies now with ``per_ip`` (TLS: the peer is the
        client), else once the real client is known (PROXY: after the header).
        """
        if self._full():
            return False
        admitted, ip = self._count_ip(prelude.peer) if per_ip else (True, None)
        if admitted:
            self.preludes[prelude] = ip
        return admitted

    def release(self, prelude: Prelude) -> None:
        """The prelude is over; idempotent (a handshake may end after its transport)."""
        if prelude not in self.preludes:
            return
        ip = self.preludes.pop(prelude)
        if ip:
            self._uncount_ip(ip)

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
        return any(ip in net for net in self._proxy_networks)

    async def _sweep_idle(self) -> None:
        timeout = self._config.idle_timeout
        if timeout <= 0:
            return
        # Four sweeps per timeout: a connection is closed between 1x and 1.25x the
        # timeout after its last read, with no per-message timer work.
        interval = max(timeout / 4, 0.01)
        limit = 4
        while True:
            await asyncio.sleep(interval)
            for conn in self._tracked():
                if conn.active:
                    conn.active = False
                    conn.idle_ticks = 0
                else:
                    conn.idle_ticks += 1
                    if conn.idle_ticks >= limit:
                        log.debug("closing idle connection %s", format_address(conn.peer))
                        conn.close()
