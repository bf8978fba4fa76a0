"""An accept loop of the server's own, for listeners the loop's ``create_server`` must not
run: TLS (the peer is counted before its handshake, see server.handshake) and, under the
asyncio loop, plain TCP.

CPython 3.11's accept loop, meeting EMFILE, schedules a retry for every one of its
``backlog`` iterations instead of one: 4,096 retries a second while out of descriptors,
and as many "Invalid file descriptor" errors once the listener closes.  This one pauses
once and retries once.  uvloop's own accept loop is kept for plain TCP: it is faster, and
it survives EMFILE (server.Server._watch_descriptors tells the operator).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("aecho.server")

# Connections taken per readiness of the listening socket, so one busy listener
# cannot hold the loop (asyncio's own accept loop takes a backlog's worth).
ACCEPT_BATCH = 64
# Accepting pauses this long when the process is out of descriptors (as asyncio does).
ACCEPT_RETRY_S = 1.0
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Accepts on one listening socket and gives each peer to ``take``."""

    def __init__(
        self,
        sock: socket.socket,
        take: Callable[[socket.socket, Any], None],
        out_of_descriptors: Callable[[], None],
    ) -> None:
        self.sock = sock
        self._take = take
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
                    if self._retry is None:
                        self._loop.remove_reader(self.sock.fileno())
                        self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                else:
                    log.debug("accept failed: %r", exc)
                return
            conn.setblocking(False)
            self._take(conn, addr)

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)
