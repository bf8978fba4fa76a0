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
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from aecho.address import format_address
from aecho.config import Framing, Offload, ProxyMode, ServerConfig
from aecho.offload.handlers import load_handler
from aecho.offload.pool import Pool
from aecho.server.acceptor import Acceptor
from aecho.server.budget import Budget
from aecho.server.connection import (
    Connection,
    InlineConnection,
    RawEchoConnection,
    Tracked,
)
from aecho.server.handshake import start_tls
from aecho.server.limits import Limits
from aecho.server.listeners import StartupError, bind_error, bind_listeners
from aecho.server.pooled import PooledConnection
from aecho.server.proxy import ProxyPrelude
from aecho.server.registry import Registry
from aecho.server.stats import Stats
from aecho.server.unsent import reset, unsent
from aecho.text import needs, plural

log = logging.getLogger("aecho.server")

# While stopping, connections are swept this often and closed once quiet.
SHUTDOWN_SWEEP_S = 0.05
# Connections taken from a listener's queue at stop, at most.
MAX_QUEUED = 16384
# ... and a connection that has sent nothing at all is closed after this many quiet sweeps.
SILENT_SWEEPS = 20
# Out-of-descriptor warnings are repeated at most this often.
EMFILE_LOG_INTERVAL_S = 10.0
# How often a uvloop server checks whether it is out of descriptors.
FD_WATCH_INTERVAL_S = 0.5


def _raise_mmap_threshold() -> None:
    """asyncio reads into a new 256 KiB bytes object each time, above glibc's first mmap
    threshold (128 KiB): every read then costs an mmap, an mremap and a munmap, and the
    asyncio loop serves a fraction of what it can.  glibc raises the threshold for good
    when a block above it is freed whole: free one of 1 MiB."""
    block = bytearray(1 << 20)
    del block


class Server(Registry):
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
        limits: Limits | None = None,
    ) -> None:
        super().__init__(config, limits)
        self.pool: Pool | None = None
        # Bytes every pooled connection together holds for the pool.
        self.budget = Budget(config.pool_budget)
        self._on_stopping = on_stopping
        self._sockets = sockets
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._forced = False
        self._cut_by_force = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._factory: Callable[[], Any] = lambda: None
        self._emfile_logged_at = -EMFILE_LOG_INTERVAL_S
        self._ssl: ssl.SSLContext | None = None
        self._udp: list[asyncio.BaseTransport] = []
        # Listeners with an accept loop of ours (TLS; plain TCP under asyncio).
        self._acceptors: list[Acceptor] = []
        self._fd_watch: asyncio.Task[None] | None = None
        self._metrics: Any = None

    def _choose_factory(self) -> Callable[[], Any]:
        """The connection class for this configuration, chosen once.

        Raises:
            aecho.offload.handlers.HandlerError: the handler cannot be loaded.
        """
        cfg = self._config
        handler = load_handler(cfg.handler, cfg.handler_dir)
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
        socks += [a.sock for a in self._acceptors if a.sock.fileno() >= 0]
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
            self.pool = Pool(
                cfg.handler,
                cfg.effective_pool_size,
                cfg.handler_timeout,
                self._stats,
                directory=cfg.handler_dir,
            )
        self._factory = self._choose_factory()
        if self._sockets is None:
            self._sockets = bind_listeners(cfg)
        if cfg.metrics_port is not None:
            await self._start_metrics(cfg.metrics_port)
        if self.pool is not None:
            await self.pool.start()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        uvloop = type(loop).__module__.startswith("uvloop")
        if not uvloop:
            _raise_mmap_threshold()
        for sock in self._sockets:
            if sock.type == socket.SOCK_DGRAM:
                from aecho.server.udp import UdpEcho

                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(UdpEcho, self._stats, sock), sock=sock
                )
                self._udp.append(transport)
                log.info("answering UDP on %s", format_address(sock.getsockname()))
                continue
            take: Callable[[socket.socket, Any], None]
            if self._ssl is not None:
                # TLS starts after the peer is counted (server.handshake).
                take = functools.partial(start_tls, self, self._factory, self._ssl)
            elif not uvloop:
                take = self._take_accepted  # see server.acceptor: asyncio's own misbehaves
            else:
                srv = await loop.create_server(
                    self._factory, sock=sock, backlog=cfg.effective_backlog
                )
                self._servers.append(srv)
                continue
            sock.listen(cfg.effective_backlog)
            acceptor = Acceptor(sock, take, self._out_of_descriptors)
            acceptor.start()
            self._acceptors.append(acceptor)
        for addr in self.addresses:
            log.info("listening on %s", format_address(addr))
        if self._ssl is not None:
            log.info("TLS on, certificate %s", cfg.tls_cert)
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="aecho-idle-sweeper")
        if self._servers:  # uvloop's accept loop: it tells no one of EMFILE
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
            raise StartupError(needs("--metrics-port", "prometheus_client", "metrics")) from None
        metrics = MetricsServer(lambda: [({}, self.snapshot())])
        try:
            await metrics.start(port)
        except OSError as exc:
            self._close_sockets()
            raise bind_error(f"metrics port 127.0.0.1:{port}", exc, "--metrics-port") from exc
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
        cut = self._tracked()
        self._cut_by_force += len(cut)
        for conn in cut:
            conn.abort()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self) -> None:
        """Serve until :meth:`request_stop`, then stop gracefully."""
        await self._stop.wait()
        await self.shutdown()

    async def _stop_accepting(self) -> None:
        """Close the listeners, taking first every connection already in their queues.

        The kernel completes handshakes before anyone accepts: closing a listener
        would reset the connections waiting in its queue, connections whose peers
        (or a load balancer, which cannot retry them) believe established.  They are
        accepted here and served like the rest; only the few microseconds between
        the last accept and the close are left.
        """
        ours = {acceptor.sock for acceptor in self._acceptors}
        queued: list[socket.socket] = []
        for sock in self._sockets or ():
            if sock.type != socket.SOCK_STREAM or sock.fileno() < 0 or sock in ours:
                continue
            while len(queued) < MAX_QUEUED:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # out of descriptors, say: the rest are lost
                    log.warning("cannot take queued connections while stopping: %s", exc)
                    break
                queued.append(conn)
        for acceptor in self._acceptors:
            acceptor.take_queued(MAX_QUEUED)  # counted (and handshaken) like any other
        self._stop_listening()
        for conn in queued:
            self._take_accepted(conn, None)
        if queued:
            log.info("took %d queued connections before closing the listeners", len(queued))

    def _take_accepted(self, conn: socket.socket, addr: object) -> None:
        """Serve a socket accepted here: its transport is made on the loop."""
        adopt = asyncio.create_task(self._adopt(conn))
        self._adopting.add(adopt)
        adopt.add_done_callback(functools.partial(self._adopted, conn))

    def _adopted(self, conn: socket.socket, adopt: asyncio.Task[None]) -> None:
        self._adopting.discard(adopt)
        if adopt.cancelled():  # by a forced stop, maybe before it began: its cleanup too
            conn.close()

    async def _adopt(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:
            log.debug("connection lost before it could be served: %r", exc)
            conn.close()

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
        await self._stop_accepting()
        for task in (self._sweeper, self._fd_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A forced stop that came before this coroutine ran has cut some already.
        open_at_stop = (
            len(self.connections) + len(self.preludes) + len(self._adopting) + self._cut_by_force
        )
        for member in list(self.connections):
            member.drain()
        deadline = time.monotonic() + self._config.graceful_timeout
        # A connection is closed once it has been quiet for a whole sweep: nothing
        # arrived, nothing is owed.  Peers mid-exchange get their replies first.
        # Connections taken from the accept queue are tracked once their transports are
        # made: until then they are in _adopting, and the stop waits for them as well.
        while (
            (self._tracked() or self._adopting) and time.monotonic() < deadline and not self._forced
        ):
            for conn in self._tracked():
                if conn.active:
                    conn.active = False
                    conn.idle_ticks = 0
                elif conn.quiet:
                    # One that has sent nothing yet may have been accepted a moment ago,
                    # its first bytes on their way: it gets longer to say something.
                    conn.idle_ticks += 1
                    if conn.rx or conn.idle_ticks >= SILENT_SWEEPS:
                        conn.close()
            await asyncio.sleep(SHUTDOWN_SWEEP_S)
        for adopt in list(self._adopting):
            adopt.cancel()
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
            "stopped: %s open at stop, %d cut %s",
            plural(open_at_stop, "connection"),
            len(cut) + self._cut_by_force,
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
        for acceptor in self._acceptors:
            acceptor.close()
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
                "out of file descriptors with %s open: new connections "
                "wait or are refused until some close (raise the limit with `ulimit -n`)",
                plural(len(self.connections) + len(self.preludes), "connection"),
            )

    async def _sweep_idle(self) -> None:
        timeout = self._config.idle_timeout
        if timeout <= 0:
            return
        # Four sweeps per timeout: a connection is closed between 1x and 1.25x the
        # timeout after its last read, with no per-message timer work.
        interval = max(timeout / 4, 0.01)
        limit = 4
        # Idle: nothing read, nothing of the peer's at the workers, and nothing taken by
        # the peer from its write buffer or, once that is empty, from the kernel's send
        # queue (asked only of a connection that looks idle: one call each).  One whose
        # peer does not read is cut: a close would wait for its buffers to drain, for ever.
        while True:
            await asyncio.sleep(interval)
            for conn in self._tracked():
                t = conn.transport
                buffered = 0 if t is None else t.get_write_buffer_size()
                if conn.active or conn.working or buffered < conn.buffered:
                    conn.active = False
                    conn.idle_ticks = 0
                    conn.unsent = 0
                elif (queued := unsent(t)) < conn.unsent:
                    conn.idle_ticks = 0
                    conn.unsent = queued
                else:
                    conn.idle_ticks += 1
                    conn.unsent = queued
                    if conn.idle_ticks >= limit:
                        log.debug("closing idle connection %s", format_address(conn.peer))
                        if buffered or queued:  # the peer takes nothing: reset it
                            reset(t)
                            conn.abort()
                        else:
                            conn.close()
                conn.buffered = buffered
