"""TLS: a connection is counted from accept, then its handshake runs.

Handing ``create_server`` an SSL context would make the loop do the handshake before
any protocol of ours exists: a peer that connects and never finishes would hold a
descriptor without counting against ``--max-connections`` or the per-IP limit.  So a
TLS listener accepts (server.acceptor), admits the peer here, and only then starts TLS
on the socket (``loop.connect_accepted_socket`` with ``--tls-handshake-timeout``).
Starting TLS on a transport that is already reading (``loop.start_tls``) is no way out:
uvloop starts reading after ``connection_made`` whatever the protocol asked, and the
ClientHello would reach the wrong protocol.  Once the handshake is done, the connection
that serves the peer takes the TLS transport over.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from aecho.address import format_address
from aecho.server.connection import Connection
from aecho.server.prelude import Prelude, PreludeHost

log = logging.getLogger("aecho.server.tls")


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


def start_tls(
    host: PreludeHost,
    factory: Callable[[], Connection],
    context: ssl.SSLContext,
    conn: socket.socket,
    addr: Any,
) -> None:
    """Count a peer just accepted on a TLS listener, then start its handshake."""
    prelude = TlsPrelude(host, factory, conn, context)
    prelude.peer = addr
    if not host.hold(prelude, per_ip=True):
        conn.close()
        return
    prelude.start()
