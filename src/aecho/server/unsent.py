"""What the kernel still holds to send on a connection's socket, and how to drop it.

The idle sweep asks it of a connection that looks idle: a peer that reads slowly takes
its replies from the kernel's send queue once the server's own write buffer is empty,
and is not idle while that queue shrinks.  One whose peer takes nothing is reset: a
plain close would leave the kernel holding that queue, up to megabytes, for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

try:
    import fcntl
    import termios

    # Linux's SIOCOUTQ: bytes in a TCP socket's send queue the peer has not acknowledged.
    OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # no such request here
    OUTQ = None

_INT = struct.Struct("i")
_ZERO = bytes(_INT.size)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: a close drops the queue, sends RST


def unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes the kernel holds that ``transport``'s peer has not taken yet; 0 if unknown (no
    socket, a closed one, or a system without the request)."""
    if OUTQ is None or transport is None:
        return 0
    sock = transport.get_extra_info("socket")
    try:
        count: int = _INT.unpack(fcntl.ioctl(sock.fileno(), OUTQ, _ZERO))[0]
    except (AttributeError, OSError, ValueError):
        return 0
    return max(count, 0)


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Make ``transport``'s close a reset that drops what the kernel still holds to send
    (if it has a socket that can be told so)."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
