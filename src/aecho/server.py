"""The server: listeners, lifecycle (start -> serve -> graceful stop), limits.

Binding is synchronous and separate (:func:`bind_listeners`) so that a daemon
can bind in the foreground, report errors on the terminal, and only then
detach and create its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable

from aecho.config import WRITE_HIGH_WATER, WRITE_LOW_WATER, Framing, ServerConfig
from aecho.connection import Connection, RawEchoConnection
from aecho.handlers import load_handler
from aecho.offload import InlineProcessor, Processor
from aecho.stats import Stats

log = logging.getLogger("aecho.server")

# While stopping, connections are swept this often and closed once quiet.
SHUTDOWN_SWEEP_S = 0.05


class StartupError(RuntimeError):
    """The server cannot start; str() is the one-line message for the operator."""


def format_address(address: object) -> str:
    """``host:port`` for IPv4, ``[host]:port`` for IPv6, the path for Unix sockets."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, bytes):
        return address.decode(errors="replace")
    return str(address)


def _bind_error(where: str, exc: OSError) -> StartupError:
    hints = {
        errno.EADDRINUSE: "address already in use: is another server on that port? "
        "Choose another --port, or --port 0 for any free port",
        errno.EADDRNOTAVAIL: "address not available on this machine: check --host",
        errno.EACCES: "permission denied: ports below 1024 need privileges; use a higher --port",
    }
    reason = hints.get(exc.errno or 0, exc.strerror or str(exc))
    return StartupError(f"cannot listen on {where}: {reason}")


def _bind_unix(path: str, backlog: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
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
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _bind_error(path, exc) from exc
    sock.setblocking(False)
    return sock


def bind_listeners(config: ServerConfig) -> list[socket.socket]:
    """Create, bind and listen on every socket the configuration asks for.

    A host name that resolves to several addresses gets one listener each; with
    ``--port 0`` they all share the port the first one was given.

    Raises:
        StartupError: the host does not resolve, or a bind or listen fails.
    """
    backlog = config.effective_backlog
    if config.unix:
        return [_bind_unix(config.unix, backlog)]
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
    return sockets


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

    @property
    def processor(self) -> Processor:
        assert self._processor is not None, "server not started"
        return self._processor

    def _choose_factory(self) -> Callable[[], Connection]:
        cfg = self.config
        if cfg.framing is Framing.raw and cfg.handler == "echo" and cfg.offload.value == "inline":
            return lambda: RawEchoConnection(self)
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
        if self._processor is None:
            self._processor = make_processor(self.config)
        self._processor.stats = self.stats
        if self._sockets is None:
            self._sockets = bind_listeners(self.config)
        await self._processor.start()
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            srv = await loop.create_server(
                self._factory, sock=sock, backlog=self.config.effective_backlog
            )
            self._servers.append(srv)
        for addr in self.addresses:
            log.info("listening on %s", format_address(addr))
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="aecho-idle-sweeper")

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
        for srv in self._servers:
            srv.close()
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
        await self.start()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            if on_ready is not None:
                on_ready(self)
            await self.serve()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("%s again: exiting now without waiting", sig.name)
            for conn in list(self.connections):
                conn.abort()
            os._exit(130 if sig == signal.SIGINT else 143)
        log.info("%s: stopping (grace %.3gs)", sig.name, self.config.graceful_timeout)
        self.request_stop()

    # -- connection registry -----------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False when it must be refused."""
        if self._stopping or len(self.connections) >= self.config.max_connections:
            self.stats.refused += 1
            log.debug("refusing %s: %d connections open", conn.peer, len(self.connections))
            return False
        self.stats.accepted += 1
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)

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
