"""The PROXY protocol prelude: a connection's first phase with ``--proxy-protocol``.

A protocol of its own: it learns who the real client is, then hands the transport
over to the connection that serves it (``set_protocol``), so it costs nothing
afterwards.  The header itself is parsed by the sans-IO ``server.proxy_protocol``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aecho.address import format_address
from aecho.config import PROXY_HEADER_TIMEOUT
from aecho.server.connection import Connection
from aecho.server.prelude import Prelude, PreludeHost
from aecho.server.proxy_protocol import ProxyError, ProxyHeaderReader, could_be_header, parse

log = logging.getLogger("aecho.server.proxy")


class ProxyPrelude(Prelude):
    """From a peer in ``--proxy-allow-from`` a PROXY header is required within
    PROXY_HEADER_TIMEOUT; from any other peer a header is refused (the connection
    is closed) and anything else is served as sent.  Once decided, the real
    connection is created with the client's address, takes over the transport and
    gets the bytes that followed the header.  One timer per connection, and only
    during the prelude.
    """

    __slots__ = ("_factory", "_got_bytes", "_reader", "_timer", "_trusted")

    def __init__(self, host: PreludeHost, factory: Callable[[], Connection]) -> None:
        super().__init__(host)
        self._factory = factory
        self._reader = ProxyHeaderReader(host.config.proxy_protocol)
        self._timer: asyncio.TimerHandle | None = None
        self._trusted = False
        self._got_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        self.active = True  # see Connection.connection_made
        self.peer = t.get_extra_info("peername")
        self._trusted = self.host.proxy_trusted(self.peer)
        # A peer outside --proxy-allow-from speaks for itself: it is the client, so the
        # per-IP limit applies from accept, as it would without the option.
        if not self.host.hold(self, per_ip=not self._trusted):
            t.abort()
            return
        if self._trusted:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(PROXY_HEADER_TIMEOUT, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.host.release(self)

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self._trusted:
            self._got_bytes = True
            try:
                header = self._reader.feed(data)
            except ProxyError as exc:
                self._reject(str(exc))
                return
            if header is not None:
                self._hand_over(header.source, self._reader.remainder)
            return
        # Only a trusted peer waits for a header: an untrusted one is decided by its
        # first read, so data that merely starts like a signature (or like a header
        # that never ends) is served at once, as it would be without the option.
        mode = self.host.config.proxy_protocol
        try:
            header = parse(data, mode) if could_be_header(data, mode) else None
        except ProxyError:
            header = None  # not a header: the peer's own bytes
        if header is not None:
            self._reject("PROXY header from a peer not in --proxy-allow-from")
        else:
            self._hand_over(None, data)

    def eof_received(self) -> bool:
        if self._trusted and self._got_bytes:
            self._reject("truncated PROXY header: the peer closed before its end")
        return False

    def _timed_out(self) -> None:
        self._timer = None
        self._reject(f"no PROXY header within {PROXY_HEADER_TIMEOUT:g}s")

    def _reject(self, reason: str) -> None:
        self.host.stats.proxy_errors += 1
        log.info("closing %s: %s", format_address(self.peer), reason)
        if self.transport is not None:
            self.transport.abort()

    def _hand_over(self, client: Any, data: bytes) -> Connection | None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self.transport
        if t is None or t.is_closing():
            self.host.release(self)
            return None
        inner = self._factory()
        if client is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "proxied connection from %s via %s",
                format_address(client),
                format_address(self.peer),
            )
        inner.peer = client if client is not None else self.peer
        inner.takes_over = self  # the connection takes this prelude's place
        t.set_protocol(inner)
        inner.connection_made(t)
        self.host.release(self)  # nothing left to release once the connection took it
        if data and not t.is_closing():
            inner.data_received(data)
        return inner
