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
from aecho.offload.handlers import HANDLER_FAILURES, Handler, as_bytes
from aecho.server.framing import FrameError, Framer, LineFramer, RawFramer
from aecho.server.stats import Stats
from aecho.text import exception_text, printable

log = logging.getLogger("aecho.server.connection")

# Reasons for which reading is paused (a bit mask).
PAUSE_WRITE = 1  # the transport's write buffer is above its high-water mark
PAUSE_WINDOW = 2  # too much is queued in the worker pool (pooled only)
PAUSE_CLOSING = 4  # never lifted: the connection ends once owed replies are out
# A connection closed while its peer may still be sending half-closes, then reads and drops
# what comes until the peer ends, or until nothing came for LINGER_S, or LINGER_MAX_S in
# all (nginx's lingering close): a close with bytes unread would reset the connection, and
# the kernel would drop the replies it has yet to send.
LINGER_S = 0.25
LINGER_MAX_S = 5.0
PAUSE_BACKLOG = 8  # messages already read wait for room (write buffer or pool window)
PAUSE_SHARED = 16  # the server-wide pool budget is spent (pooled only)

# Most messages an inline connection handles before it lets the loop turn: a read of
# tiny lines holds a hundred thousand, and other peers wait while they run.
SLICE_MESSAGES = 512


class Owner(Protocol):
    """What every protocol of a connection reads from the server that owns it."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stats(self) -> Stats: ...


class Host(Owner, Protocol):
    """What a connection needs from the server that owns it."""

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False when it must be refused.

        A connection whose ``takes_over`` names a prelude still held takes that
        prelude's place: counted since accept, it is not checked against
        ``--max-connections`` again, nor against the per-IP limit if the prelude was.
        """
        ...

    def forget(self, conn: Connection) -> None:
        """The connection is gone."""
        ...


def error_line(exc: BaseException) -> bytes:
    """The line a peer gets for a failed message (line framing)."""
    text = printable(exception_text(exc))
    return f"ERR {type(exc).__name__}: {text}\n".encode("utf-8", "replace")


class Tracked(asyncio.Protocol):
    """What the server's sweeps (idle, shutdown) see of a connection in any phase."""

    __slots__ = ("active", "buffered", "idle_ticks", "peer", "rx", "transport", "unsent")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.active = False  # read since the last sweep
        self.idle_ticks = 0
        self.buffered = 0  # its write buffer at the last idle sweep (Server._sweep_idle)
        self.unsent = 0  # the kernel's bytes unsent at the last sweep it looked idle at
        # Bytes read; the server adds a connection's to its totals when it ends and
        # metrics sum the open ones at scrape time.  A prelude reads none of its own.
        self.rx = 0

    @property
    def quiet(self) -> bool:
        """Nothing owed to the peer: a graceful stop may close it (a prelude owes none)."""
        return True

    @property
    def working(self) -> bool:
        """The server is still working on what the peer sent (a worker pool has it): the
        peer waits on the server, so the connection is not idle."""
        return False

    def drain(self) -> None:
        """A graceful stop began: stop starting new messages.  By default nothing is in
        progress (a raw chunk is whole once read): the server closes it once quiet."""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Connection(Tracked):
    """What every served connection has: its transport, peer, counters and pause state."""

    __slots__ = ("_paused", "host", "takes_over", "tx")

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host
        self.tx = 0  # bytes written (see Tracked.rx)
        self._paused = 0
        # The prelude (PROXY header, TLS handshake) whose place this connection takes,
        # set by that prelude just before it hands the transport over (see Host.admit).
        self.takes_over: Tracked | None = None

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
    """A connection whose bytes go through a framer into messages (inline or pooled).

    A read may hold more messages than may be handled at once (their replies would
    pass the write high-water mark, or the pool's window): the rest wait in a backlog,
    reading pauses, and the backlog is taken up again from the loop once there is room.
    """

    __slots__ = (
        "_backlog",
        "_backlog_at",
        "_draining_at",
        "_eof",
        "_framer",
        "_last_words",
        "_lingering",
        "_peer_eof",
    )

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._eof = False  # read no more: the peer ended, or the connection is finishing
        self._peer_eof = False
        self._lingering = False  # half-closed, dropping what the peer still sends
        cfg = host.config
        self._framer: Framer = (
            LineFramer(cfg.max_line) if cfg.framing is Framing.line else RawFramer()
        )
        # Messages read but not handled yet, from index _backlog_at on.
        self._backlog: list[bytes] | None = None
        self._backlog_at = 0
        # An error line owed after the replies still owed (framing violation).
        self._last_words = b""
        # Bytes read when a graceful stop began (-1: not stopping).
        self._draining_at = -1

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.rx += len(data)
        if self._lingering:
            return  # after the half-close: read only so that the close is not a reset
        try:
            messages = self._framer.feed(data)
        except FrameError as exc:
            if exc.messages:
                self._take(exc.messages)
            self._refuse(exc)
            return
        if messages:
            self._take(messages)
        if self._draining_at >= 0:
            self._stop_after_current()

    def eof_received(self) -> bool:
        self._eof = self._peer_eof = True
        if self._lingering:
            return False  # the peer has read its replies and ended: close
        if isinstance(self._framer, LineFramer) and self._framer.pending:
            # A last line without its terminator is still a message the peer sent.
            self._take(self._framer.feed(b"\n"))
        # Keep the write side open while replies are still owed.
        return self._owes

    @property
    def _owes(self) -> bool:
        """Replies still to be handled or written by this connection itself."""
        return self._backlog is not None

    @property
    def quiet(self) -> bool:
        # A line half received is a message in progress: a graceful stop waits for it.
        return (
            not self._owes
            and not (
                isinstance(self._framer, LineFramer)
                and self._framer.pending
                and not self._lingering
            )
            and super().quiet
        )

    def drain(self) -> None:
        """A graceful stop began: finish the line in progress, start no new one; one that
        has read nothing yet is served its first line, if it comes before the server
        closes it (see Server.shutdown).

        Raw framing keeps :class:`Connection`'s way: a chunk is whole once read.
        """
        if isinstance(self._framer, LineFramer):
            self._draining_at = self.rx
            if self.rx:
                self._stop_after_current()

    def _stop_after_current(self) -> None:
        framer = self._framer
        assert isinstance(framer, LineFramer)  # only line framing drains
        pending = framer.pending
        start = self.rx - pending
        if pending and (start < self._draining_at or start == 0):
            return  # the line in progress began before the stop, or is the first: finish it
        self._finish()

    def _finish(self) -> None:
        """Read no more; close once every reply owed (and any last words) is out."""
        self._eof = True
        self._pause(PAUSE_CLOSING)
        if not self._owes:
            self._close_now()

    def _close_now(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._last_words:
            self.tx += len(self._last_words)
            transport.write(self._last_words)
        if self._peer_eof or self._lingering or not transport.can_write_eof():
            transport.close()
            return
        # Reading stopped while the peer may still be sending (a graceful stop, a refused
        # line): linger (see LINGER_S).
        transport.write_eof()  # after the replies still buffered
        self._lingering = True
        self._paused = 0
        transport.resume_reading()
        loop = asyncio.get_running_loop()
        loop.call_later(LINGER_S, self._linger, loop.time() + LINGER_MAX_S, self.rx)

    def _linger(self, until: float, rx: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if self.rx == rx or loop.time() >= until:
            transport.close()
        else:
            loop.call_later(LINGER_S, self._linger, until, self.rx)

    def _take(self, messages: list[bytes]) -> None:
        if self._backlog is not None:
            # Read while a backlog waits (a TLS layer may deliver after a pause): queue.
            self._backlog = self._backlog[self._backlog_at :] + messages
            self._backlog_at = 0
            return
        self._handle(messages, 0)

    def _handle(self, messages: list[bytes], start: int) -> None:
        """Handle ``messages[start:]`` and see their replies written, in order; what
        cannot be handled now goes to :meth:`_defer`."""
        raise NotImplementedError

    def _defer(self, messages: list[bytes], at: int) -> None:
        """Keep ``messages[at:]`` for later and stop reading until they are handled."""
        self._backlog = messages
        self._backlog_at = at
        self._pause(PAUSE_BACKLOG)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._room_again()  # a backlog held back by the full write buffer

    def _room_again(self) -> None:
        """What held the backlog back has cleared: take it up from the loop, not from here."""
        if self._backlog is not None and self.transport is not None:
            asyncio.get_running_loop().call_soon(self._resume_backlog)

    def _resume_backlog(self) -> None:
        messages = self._backlog
        if messages is None or self.transport is None or self.transport.is_closing():
            return
        self._backlog = None
        self._handle(messages, self._backlog_at)
        if self._backlog is None:
            self._resume(PAUSE_BACKLOG)
            if self._eof:
                self._finish()

    def _refuse(self, exc: FrameError) -> None:
        """The peer broke the framing: one error line after the replies owed, then close."""
        log.info("closing %s: %s", format_address(self.peer), exc)
        self._last_words = f"ERR {exc}\n".encode()
        self._finish()

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
            printable(exception_text(exc)),
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )
        if isinstance(self._framer, LineFramer):
            out.append(error_line(exc))
            return True
        self._backlog = None
        if self.transport is not None:
            if out:
                payload = b"".join(out)
                self.tx += len(payload)
                self.transport.write(payload)
            self.transport.close()
        return False


class InlineConnection(FramedConnection):
    """Runs the handler on the event loop, in the connection's own call.

    Replies go out in slices of about the write low-water mark; after each slice the
    rest of the read waits in the backlog for the loop's next turn, or, when the write
    buffer is above its high-water mark, until the peer has read.  So a read of a
    hundred thousand tiny lines neither holds the loop for its whole length nor grows
    the buffer far past the mark, however much its replies outgrow it.
    """

    __slots__ = ("_handler", "_slice")

    def __init__(self, host: Host, handler: Handler) -> None:
        super().__init__(host)
        self._handler = handler
        self._slice = host.config.write_low

    def _handle(self, messages: list[bytes], start: int) -> None:
        transport = self.transport
        assert transport is not None
        handler = self._handler
        encode = self._framer.encode
        out: list[bytes] = []
        size = 0
        i = start
        n = len(messages)
        while i < n:
            message = messages[i]
            i += 1
            try:
                reply = handler(message)
                if type(reply) is not bytes:
                    reply = as_bytes(reply)
                reply = encode(reply)
            except HANDLER_FAILURES as exc:
                if not self._handler_failed(exc, out):
                    return
                continue
            out.append(reply)
            size += len(reply)
            if (size >= self._slice or i - start >= SLICE_MESSAGES) and i < n:
                # The rest waits for the loop's next turn, or for the peer to read.
                self._write(transport, out)
                out = []
                self._defer(messages, i)
                if not self._paused & PAUSE_WRITE:
                    self._room_again()
                break
        self.host.stats.messages += i - start
        if out:
            self._write(transport, out)

    def _write(self, transport: asyncio.Transport, out: list[bytes]) -> None:
        payload = out[0] if len(out) == 1 else b"".join(out)
        self.tx += len(payload)
        transport.write(payload)
