"""UDP echo (RFC 862): every datagram goes back to its sender, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from aecho.server.stats import Stats

log = logging.getLogger("aecho.server.udp")

# The largest UDP payload over IPv4 (65,535 - 8 byte UDP header - 20 byte IP header).
MAX_DATAGRAM = 65_507
# Room for bursts of large datagrams before the kernel drops them.
SOCKET_BUFFER = 4 * 1024 * 1024


def bind_udp(family: int, address: tuple[object, ...]) -> socket.socket:
    """A non-blocking UDP socket bound to ``address``.

    Raises:
        OSError: the bind failed (the caller turns it into a start-up error).
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # A smaller buffer only means earlier drops under bursts.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class UdpEcho(asyncio.DatagramProtocol):
    """One reply per datagram, the exact bytes received."""

    def __init__(self, stats: Stats, sock: socket.socket) -> None:
        self.stats = stats
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.stats.udp_datagrams += 1
        self.stats.udp_bytes += len(data)
        if not data:
            # Transports drop empty sends, but an empty datagram deserves its echo too.
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)
            return
        assert self.transport is not None
        self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (a sender that went away) concern one peer, never the server.
        log.debug("udp error: %r", exc)
