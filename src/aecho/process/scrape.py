"""The supervisor's ``/metrics``: one endpoint with the totals of every serving process.

Served from the supervisor's ``select`` loop (it has no event loop): a request is read
without blocking, then the supervisor collects a snapshot from each serving process
and the response is rendered by ``server.metrics``, like a single server's.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable

from aecho.server.listeners import bind_error
from aecho.server.metrics import make_registry, respond
from aecho.server.stats import Stats

log = logging.getLogger("aecho.metrics")

REQUEST_TIMEOUT_S = 10.0
MAX_REQUEST = 8192

Parts = list[tuple[dict[str, str] | None, Stats]]
Collect = Callable[[Callable[[Parts], None]], None]


class MetricsEndpoint:
    """GET /metrics on 127.0.0.1:PORT, on a selector the supervisor runs."""

    def __init__(self, port: int, selector: selectors.BaseSelector) -> None:
        self.port = port
        self.selector = selector
        self.sock: socket.socket | None = None
        self._clients: dict[socket.socket, tuple[bytearray, float]] = {}
        self._collect: Collect | None = None

    def start(self, collect: Collect) -> None:
        """Listen; ``collect(done)`` gathers the parts and calls ``done(parts)``.

        Raises:
            aecho.server.listeners.StartupError: the port cannot be bound.
        """
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise bind_error(f"metrics port 127.0.0.1:{self.port}", exc, "--metrics-port") from exc
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._collect = collect
        self.selector.register(sock, selectors.EVENT_READ, self._accept)
        log.info("metrics on http://127.0.0.1:%d/metrics", self.port)

    def _accept(self) -> None:
        assert self.sock is not None
        self._expire()
        try:
            client, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of descriptors: try again on the next connection
            log.debug("metrics accept failed: %s", exc)
            return
        client.setblocking(False)
        self._clients[client] = (bytearray(), time.monotonic() + REQUEST_TIMEOUT_S)
        self.selector.register(client, selectors.EVENT_READ, lambda: self._read(client))

    def _read(self, client: socket.socket) -> None:
        buf, _ = self._clients[client]
        try:
            chunk = client.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buf += chunk
        if b"\r\n\r\n" in buf:
            head = bytes(buf.split(b"\r\n\r\n", 1)[0])
            assert self._collect is not None
            self._collect(lambda parts: self._answer(client, head, parts))
        elif not chunk or len(buf) > MAX_REQUEST:
            self._drop(client)

    def _answer(self, client: socket.socket, head: bytes, parts: Parts) -> None:
        response = respond(make_registry(lambda: parts), head)
        with contextlib.suppress(OSError):
            client.settimeout(2.0)  # a few KiB to a local scraper
            client.sendall(response)
        self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._clients.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client)
        client.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for client, (_, deadline) in list(self._clients.items()):
            if now > deadline:
                self._drop(client)

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
