"""Inline connections: bytes in -> framer -> handler on the loop -> replies out.

``RawEchoConnection`` serves the default (raw framing, inline echo): one write per
read.  ``InlineConnection`` runs any other handler on the loop.  Both share
:class:`Connection` (lifecycle, counters, pausing) with the pooled protocol
(``server.pooled``).  A connection knows its server only through :class:`Host`.

Hot-path rule: ``data_received`` does no timer work (idle tracking is a flag the
server's sweeper reads).  Reading pauses for independent reasons (a bit mask) and
resumes only when none holds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, cast

from aecho.address import format_address
from aecho.config import Framing, ServerConfig
from aecho.offload.handlers import Handler
from aecho.server.framing import FrameError, Framer, LineFramer, RawFramer
from aecho.server.stats import Stats

log = logging.getLogger("aecho.server.connection")

# Reasons for which reading is paused (a bit mask).
PAUSE_WRITE = 1  # the transport's write buffer is above its high-water mark
PAUSE_WINDOW = 2  # too much is queued in the worker pool (pooled only)
PAUSE_CLOSING = 4  # never lifted: the connection ends once owed replies are out


class Owner(Protocol):
    """What every protocol of a connection reads from the server that owns it."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stats(self) -> Stats: ...


class Host(Owner, Protocol):
    """What a connection needs from the server that owns it."""

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False when it must be refused."""
        ...

    def forget(self, conn: Connection) -> None:
        """The connection is gone."""
        ...


def error_line(exc: BaseException) -> bytes:
    """The line a peer gets for a failed message (line framing)."""
    text = str(exc).replace("\n", " ").replace("\r", " ")
    return f"ERR {type(exc).__name__}: {text}\n".encode("utf-8", "replace")


class Connection(asyncio.Protocol):
    """What every served connection has: its transport, peer, counters and pause state."""

    __slots__ = ("_paused", "active", "host", "idle_ticks", "peer", "rx", "transport", "tx")

    def __init__(self, host: Host) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.active = False
        self.idle_ticks = 0
        self.peer: Any = None
        # Bytes read and written; the server adds them to its totals when the
        # connection ends and metrics sum the open ones at scrape time.
        self.rx = 0
        self.tx = 0
        self._paused = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        # New counts as active: a stopping server's sweep gives it a whole interval for
        # its first bytes instead of closing it as "quiet" before they arrive.
        self.active = True
        if self.peer is None:  # a PROXY header may already have named the real client
            self.peer = t.get_extra_info("peername")
        if not self.host.admit(self):
            t.abort()
            return
        limits = self.host.config
        t.set_write_buffer_limits(limits.write_high, limits.write_low)

    @property
    def bytes_out(self) -> int:
        return self.tx

    def connection_lost(self, exc: Exception | None) -> None:
        self.host.forget(self)
        stats = self.host.stats
        stats.bytes_in += self.rx
        stats.bytes_out += self.bytes_out
        if exc is not None:
            log.debug("connection %s lost: %r", format_address(self.peer), exc)

    def pause_writing(self) -> None:
        self._pause(PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._resume(PAUSE_WRITE)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- server-side control -----------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """Nothing owed to the peer: nothing left to write."""
        t = self.transport
        return t is None or t.get_write_buffer_size() == 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class RawEchoConnection(Connection):
    """Raw framing, inline ``echo``: every chunk goes straight back.

    This is the default configuration, so it must cost no more than a bare
    echo protocol: one flag store and one write per read.
    """

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.rx += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    @property
    def bytes_out(self) -> int:
        return self.rx  # every byte read is written straight back


class FramedConnection(Connection):
    """A connection whose bytes go through a framer into messages (inline or pooled)."""

    __slots__ = ("_eof", "_framer")

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._eof = False
        cfg = host.config
        self._framer: Framer = (
            LineFramer(cfg.max_line) if cfg.framing is Framing.line else RawFramer()
        )

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.rx += len(data)
        try:
            messages = self._framer.feed(data)
        except FrameError as exc:
            if exc.messages:
                self._handle(exc.messages)
            self._refuse(exc)
            return
        if messages:
            self._handle(messages)

    def eof_received(self) -> bool:
        self._eof = True
        if isinstance(self._framer, LineFramer) and self._framer.pending:
            # A last line without its terminator is still a message the peer sent.
            self._handle(self._framer.feed(b"\n"))
        return False

    def _handle(self, messages: list[bytes]) -> None:
        """Process ``messages`` and see their replies written, in order."""
        raise NotImplementedError

    def _refuse(self, exc: FrameError) -> None:
        """The peer broke the framing: one error line, then close."""
        log.info("closing %s: %s", format_address(self.peer), exc)
        transport = self.transport
        if transport is None:
            return
        last_words = f"ERR {exc}\n".encode()
        self.tx += len(last_words)
        transport.write(last_words)
        transport.close()

    def _handler_failed(self, exc: BaseException, out: list[bytes]) -> bool:
        """Record a failed message; return whether the connection carries on.

        Line framing answers the message with an error line; raw framing has no way
        to say "this chunk failed", so the replies so far go out and the connection ends.
        """
        self.host.stats.handler_errors += 1
        log.warning(
            "handler %s failed for %s: %s: %s",
            self.host.config.handler,
            format_address(self.peer),
            type(exc).__name__,
            exc,
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )
        if isinstance(self._framer, LineFramer):
            out.append(error_line(exc))
            return True
        if self.transport is not None:
            if out:
                payload = b"".join(out)
                self.tx += len(payload)
                self.transport.write(payload)
            self.transport.close()
        return False


class InlineConnection(FramedConnection):
    """Runs the handler on the event loop, in the connection's own call."""

    __slots__ = ("_handler",)

    def __init__(self, host: Host, handler: Handler) -> None:
        super().__init__(host)
        self._handler = handler

    def _handle(self, messages: list[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        handler = self._handler
        encode = self._framer.encode
        out: list[bytes] = []
        for message in messages:
            try:
                out.append(encode(handler(message)))
            except Exception as exc:
                if not self._handler_failed(exc, out):
                    return
        self.host.stats.messages += len(messages)
        payload = out[0] if len(out) == 1 else b"".join(out)
        self.tx += len(payload)
        transport.write(payload)
