"""TLS: a connection is counted from accept, then its handshake runs.

Handing ``create_server`` an SSL context would make the loop do the handshake before
any protocol of ours exists: a peer that connects and never finishes would hold a
descriptor without counting against ``--max-connections`` or the per-IP limit.  So a
TLS listener accepts (server.acceptor), admits the peer here, and only then runs TLS on
the socket: a plain transport (``loop.connect_accepted_socket``) under a record layer of
the server's own (server.tlsstream), the handshake within ``--tls-handshake-timeout``
of accept.  Once the handshake is done, the connection that serves the peer takes the
stream over, and the prelude's place with it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aecho.address import format_address
from aecho.server.connection import Connection
from aecho.server.prelude import Prelude, PreludeHost
from aecho.server.tlsstream import TlsStream

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
        # Cancelling a handshake under way aborts its transport, and the socket with it.
        if self._task is not None:
            self._task.cancel()

    abort = close

    async def _handshake(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        stream = TlsStream(self._context, self._hand_over)
        try:
            async with asyncio.timeout(self.host.config.tls_handshake_timeout):
                # The transport takes the socket before the first await: from here on,
                # closing it is the transport's business (its descriptor may be reused).
                transport, _ = await loop.connect_accepted_socket(lambda: stream, sock)
                self.transport = transport
                await stream.handshake
        except (Exception, asyncio.CancelledError) as exc:
            if not stream.shaken:
                # A timeout, a bad hello, a reset, a stop: this peer only.  A transport
                # still being made is closed by the loop itself; one closing already
                # (after the alert for a bad hello) is left to send it.
                if not stream.is_closing():
                    stream.abort()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self.host.stats.tls_failures += 1
                log.debug("TLS handshake with %s failed: %r", format_address(self.peer), exc)
            # else the handshake was done, and handed over, just before the timeout fired.
        finally:
            self.host.release(self)

    def _hand_over(self, stream: TlsStream) -> None:
        """The handshake is done: the serving connection takes over, and this prelude's
        place, within this call, so the peer's first bytes already reach it."""
        inner = self._factory()
        inner.peer = self.peer
        inner.takes_over = self
        stream.set_protocol(inner)
        inner.connection_made(stream)
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
