"""TLS listeners: a connection is counted from accept, then its handshake runs.

Handing ``create_server`` an SSL context would make the loop do the handshake before
any protocol of ours exists: a peer that connects and never finishes would hold a
descriptor without counting against ``--max-connections`` or the per-IP limit.  So a
TLS listener accepts here, admits the peer, and only then starts TLS on the socket
(``loop.connect_accepted_socket`` with ``--tls-handshake-timeout``).  Starting TLS on a
transport that is already reading (``loop.start_tls``) is no way out: uvloop starts
reading after ``connection_made`` whatever the protocol asked, and the ClientHello would
reach the wrong protocol.  Once the handshake is done, the connection that serves the
peer takes the TLS transport over.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import cast

from aecho.address import format_address
from aecho.server.connection import Connection
from aecho.server.prelude import Prelude, PreludeHost

log = logging.getLogger("aecho.server.tls")

# Connections taken per readiness of the listening socket, so one busy listener
# cannot hold the loop (asyncio's own accept loop takes a backlog's worth).
ACCEPT_BATCH = 64
# Accepting pauses this long when the process is out of descriptors (as asyncio does).
ACCEPT_RETRY_S = 1.0
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class TlsPrelude(Prelude):
    """One peer from accept to the end of its handshake, then its connection."""

    __slots__ = ("_context", "_factory", "_sock", "_task")

    def __init__(
        self,
        host: PreludeHost,
        factory: Callable[[], Connection],
        sock: socket.socket,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host)
        self.active = True  # new counts as active: see Connection.connection_made
        self._factory = factory
        self._context = context
        # The accepted socket until the handshake's transport owns it.
        self._sock: socket.socket | None = sock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._handshake())

    def close(self) -> None:
        if self._sock is not None:  # the handshake has not begun: nothing else owns it
            self._sock.close()
            self._sock = None
            self.host.release(self)
        # Cancelling a handshake under way closes its transport, and the socket with it.
        if self._task is not None:
            self._task.cancel()

    abort = close

    async def _handshake(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # The transport takes the socket before the first await: from here on,
            # closing it is the transport's business (its descriptor may be reused).
            await loop.connect_accepted_socket(
                lambda: self,
                sock,
                ssl=self._context,
                ssl_handshake_timeout=self.host.config.tls_handshake_timeout,
            )
        except Exception as exc:  # timeout, bad hello, reset: this peer only
            self.host.stats.tls_failures += 1
            log.debug("TLS handshake with %s failed: %r", format_address(self.peer), exc)
        finally:
            self.host.release(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The handshake is done: the serving connection takes over, and this prelude's
        # place, within this call, so the peer's first bytes already reach it.
        tls = cast(asyncio.Transport, transport)
        self.transport = tls
        inner = self._factory()
        inner.peer = self.peer
        inner.takes_over = self
        tls.set_protocol(inner)
        inner.connection_made(tls)
        self.host.release(self)  # nothing left to release once the connection took it


class TlsListener:
    """Accepts on one listening socket and starts a :class:`TlsPrelude` for each peer."""

    def __init__(
        self,
        sock: socket.socket,
        host: PreludeHost,
        factory: Callable[[], Connection],
        context: ssl.SSLContext,
        out_of_descriptors: Callable[[], None],
    ) -> None:
        self.sock = sock
        self._host = host
        self._factory = factory
        self._context = context
        self._out_of_descriptors = out_of_descriptors
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections stay)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def take_queued(self, limit: int) -> None:
        """Take what waits in the listening socket's queue (before closing it at a stop)."""
        if self.sock.fileno() >= 0:
            self._accept(limit)

    def _accept(self, limit: int = ACCEPT_BATCH) -> None:
        for _ in range(limit):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS and self._loop is not None:
                    self._out_of_descriptors()
                    self._loop.remove_reader(self.sock.fileno())
                    self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                else:
                    log.debug("accept failed: %r", exc)
                return
            conn.setblocking(False)
            prelude = TlsPrelude(self._host, self._factory, conn, self._context)
            prelude.peer = addr
            if not self._host.hold(prelude, per_ip=True):
                conn.close()
                continue
            prelude.start()

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)
