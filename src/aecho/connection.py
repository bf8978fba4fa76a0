"""One connection: bytes in -> framer -> processor -> ordered replies out.

Three classes, chosen once per server: ``Connection`` runs the handler inline,
``PooledConnection`` sends messages to the worker pool, and the plain raw echo
gets ``RawEchoConnection``, whose ``data_received`` is one write.  Hot-path
rule: ``data_received`` does no timer work (idle tracking is a flag the
server's sweeper reads).  Reading pauses for two independent reasons
(the transport's write buffer is above its high-water mark, or too many
messages wait in a worker pool); it resumes only when neither holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aecho.address import format_address
from aecho.config import PROXY_HEADER_TIMEOUT
from aecho.framing import FrameError, Framer, LineFramer, RawFramer
from aecho.offload import Outcome
from aecho.proxy_protocol import ProxyError, ProxyHeaderReader, could_be_header

if TYPE_CHECKING:
    from aecho.server import Server

log = logging.getLogger("aecho.connection")

# Reasons for which reading is paused (a bit mask).
_PAUSE_WRITE = 1
_PAUSE_WINDOW = 2
_PAUSE_CLOSING = 4  # never lifted: the connection ends once owed replies are out

# Messages a connection may have queued in a worker pool before it stops reading.
INFLIGHT_WINDOW = 256


def error_line(exc: BaseException) -> bytes:
    """The line a peer gets for a failed message (line framing)."""
    text = str(exc).replace("\n", " ").replace("\r", " ")
    return f"ERR {type(exc).__name__}: {text}\n".encode("utf-8", "replace")


class Connection(asyncio.Protocol):
    """The general path: any framing, any handler, inline or pooled."""

    __slots__ = (
        "_eof",
        "_framer",
        "_inflight",
        "_last_words",
        "_paused",
        "active",
        "idle_ticks",
        "peer",
        "rx",
        "server",
        "transport",
        "tx",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.active = False
        self.idle_ticks = 0
        self.peer: Any = None
        # Bytes read and written; the server adds them to its totals when the
        # connection ends and metrics sum the open ones at scrape time.
        self.rx = 0
        self.tx = 0
        self._paused = 0
        self._eof = False
        self._last_words = b""
        # Messages in a worker pool whose replies are not written yet (pooled only).
        self._inflight = 0
        self._framer: Framer = self._make_framer()

    def _make_framer(self) -> Framer:
        cfg = self.server.config
        if cfg.framing.value == "line":
            return LineFramer(cfg.max_line)
        return RawFramer()

    # -- lifecycle ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        if self.peer is None:  # a PROXY header may already have named the real client
            self.peer = t.get_extra_info("peername")
        if not self.server.admit(self):
            t.abort()
            return
        t.set_write_buffer_limits(self.server.write_high, self.server.write_low)

    @property
    def bytes_out(self) -> int:
        return self.tx

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        stats = self.server.stats
        stats.bytes_in += self.rx
        stats.bytes_out += self.bytes_out
        if exc is not None:
            log.debug("connection %s lost: %r", self.peer, exc)

    def eof_received(self) -> bool:
        self._eof = True
        if isinstance(self._framer, LineFramer) and self._framer.pending:
            # A last line without its terminator is still a message the peer sent.
            self._handle(self._framer.feed(b"\n"))
        # Keep the write side open while pooled replies are outstanding.
        return bool(self._inflight)

    def pause_writing(self) -> None:
        self._pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._resume(_PAUSE_WRITE)

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

    # -- data --------------------------------------------------------------------------------

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

    def _handle(self, messages: list[bytes]) -> None:
        """Run the handler on ``messages`` and write the replies (PooledConnection: queue them)."""
        transport = self.transport
        assert transport is not None
        handler = self.server.processor.handler
        encode = self._framer.encode
        out: list[bytes] = []
        for message in messages:
            try:
                out.append(encode(handler(message)))
            except Exception as exc:
                if not self._handler_failed(exc, out):
                    return
        self.server.stats.messages += len(messages)
        payload = out[0] if len(out) == 1 else b"".join(out)
        self.tx += len(payload)
        transport.write(payload)

    def _handler_failed(self, exc: BaseException, out: list[bytes]) -> bool:
        """Record a failed message; return whether the connection carries on."""
        self.server.stats.handler_errors += 1
        log.warning(
            "handler %s failed for %s: %r", self.server.processor.handler_name, self.peer, exc
        )
        if isinstance(self._framer, LineFramer):
            out.append(error_line(exc))
            return True
        # Raw framing has no way to say "this chunk failed": the connection ends.
        if self.transport is not None:
            if out:
                payload = b"".join(out)
                self.tx += len(payload)
                self.transport.write(payload)
            self.transport.close()
        return False

    def _refuse(self, exc: FrameError) -> None:
        log.info("closing %s: %s", self.peer, exc)
        transport = self.transport
        if transport is None:
            return
        last_words = f"ERR {exc}\n".encode()
        if self._inflight:
            # Pooled replies to earlier lines are still owed: the error goes after them.
            self._last_words = last_words
            self._eof = True
            self._pause(_PAUSE_CLOSING)
            return
        self.tx += len(last_words)
        transport.write(last_words)
        transport.close()

    # -- server-side control -----------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """Nothing owed to the peer: no queued work and nothing left to write."""
        t = self.transport
        return not self._inflight and (t is None or t.get_write_buffer_size() == 0)

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

    def eof_received(self) -> bool:
        self._eof = True
        return False


class PooledConnection(Connection):
    """``--offload process``: messages go to the worker pool; replies leave in arrival order.

    Each submission (the messages of one read) gets a sequence number, and
    replies are written strictly in that order: a submission whose batch comes
    back before an earlier one's waits in ``_early``, and the earlier one writes
    it.  With more than INFLIGHT_WINDOW messages out, reading pauses.  Raw
    framing skips the framer (a chunk is the message, a reply goes back as it
    is).  In the common case, one chunk whose reply is next in line, nothing
    is kept between the read and the reply but the chunk itself and an int.
    """

    __slots__ = ("_early", "_encode", "_next_in", "_next_out", "_on_done", "_submit", "_submit_one")

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self._next_in = 0  # sequence number of the next submission
        self._next_out = 0  # sequence number of the next submission to write
        self._early: dict[int, tuple[list[Outcome], int, int]] | None = None
        raw = isinstance(self._framer, RawFramer)
        self._encode: Callable[[bytes], bytes] | None = None if raw else self._framer.encode
        self._on_done = self._batch_done
        processor = server.processor
        self._submit = processor.submit_to
        self._submit_one = processor.submit_one

    def data_received(self, data: bytes) -> None:
        if self._encode is not None:
            super().data_received(data)
            return
        self.active = True
        self.rx += len(data)
        seq = self._next_in
        self._next_in = seq + 1
        self._inflight += 1
        if self._inflight >= INFLIGHT_WINDOW:
            self._pause(_PAUSE_WINDOW)
        self._submit_one(data, self._on_done, seq)

    def _handle(self, messages: list[bytes]) -> None:
        seq = self._next_in
        self._next_in = seq + 1
        self._inflight += len(messages)
        if self._inflight >= INFLIGHT_WINDOW:
            self._pause(_PAUSE_WINDOW)
        self._submit(messages, self._on_done, seq)

    def _batch_done(self, seq: int, outcomes: list[Outcome], start: int, stop: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if seq != self._next_out:
            # An earlier submission is still out; it writes this one when it is back.
            if self._early is None:
                self._early = {}
            self._early[seq] = (outcomes, start, stop)
            return
        if stop - start == 1 and self._encode is None and not self._early:
            # The common case: one raw chunk, and next in line.
            reply = outcomes[start]
            if type(reply) is bytes:
                self._next_out = seq + 1
                self._inflight -= 1
                self.tx += len(reply)
                transport.write(reply)
                if self._paused or self._eof:
                    self._after_write(transport)
                return
        encode = self._encode
        early = self._early
        out: list[bytes] = []
        while True:
            for i in range(start, stop):
                outcome = outcomes[i]
                if isinstance(outcome, BaseException):
                    if not self._handler_failed(outcome, out):
                        return
                else:
                    out.append(outcome if encode is None else encode(outcome))
            self._inflight -= stop - start
            seq += 1
            if not early or seq not in early:
                break
            outcomes, start, stop = early.pop(seq)
        self._next_out = seq
        if out:
            payload = out[0] if len(out) == 1 else b"".join(out)
            self.tx += len(payload)
            transport.write(payload)
        self._after_write(transport)

    def _after_write(self, transport: asyncio.Transport) -> None:
        """Replies were written: read again below the window, end after the last one owed."""
        if self._paused & _PAUSE_WINDOW and self._inflight < INFLIGHT_WINDOW:
            self._resume(_PAUSE_WINDOW)
        if self._eof and not self._inflight:
            if self._last_words:
                self.tx += len(self._last_words)
                transport.write(self._last_words)
            transport.close()


class ProxyPrelude(Connection):
    """A connection's first phase with ``--proxy-protocol``: find out who the client is.

    From a peer in ``--proxy-allow-from`` a PROXY header is required within
    PROXY_HEADER_TIMEOUT; from any other peer a header is refused (the
    connection is closed) and anything else is served as sent.  Once decided,
    the real connection is created with the client's address, takes over the
    transport (``set_protocol``) and gets the bytes that followed the header,
    so the prelude costs nothing afterwards.  One timer per connection, and
    only during the prelude.
    """

    __slots__ = ("_buf", "_factory", "_reader", "_timer", "_trusted")

    def __init__(self, server: Server, factory: Callable[[], Connection]) -> None:
        super().__init__(server)
        self._factory = factory
        self._reader = ProxyHeaderReader(server.config.proxy_protocol)
        self._timer: asyncio.TimerHandle | None = None
        self._trusted = False
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        self.peer = t.get_extra_info("peername")
        if not self.server.hold(self):
            t.abort()
            return
        self._trusted = self.server.proxy_trusted(self.peer)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(PROXY_HEADER_TIMEOUT, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self._trusted:
            try:
                header = self._reader.feed(data)
            except ProxyError as exc:
                self._reject(str(exc))
                return
            if header is not None:
                self._hand_over(header.source, self._reader.remainder)
            return
        self._buf += data
        verdict = could_be_header(self._buf, self.server.config.proxy_protocol)
        if verdict:
            self._reject("PROXY header from a peer not in --proxy-allow-from")
        elif verdict is not None:
            self._hand_over(None, self._buf)

    def eof_received(self) -> bool:
        if self._trusted or not self._buf:
            return False
        # The start of a signature, then EOF: it was data after all.
        inner = self._hand_over(None, self._buf)
        return inner is not None and bool(inner.eof_received())

    def _timed_out(self) -> None:
        self._timer = None
        if self._trusted:
            self._reject(f"no PROXY header within {PROXY_HEADER_TIMEOUT:g}s")
        else:
            self._hand_over(None, self._buf)

    def _reject(self, reason: str) -> None:
        self.server.stats.proxy_errors += 1
        log.info("closing %s: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.abort()

    def _hand_over(self, client: Any, data: bytes) -> Connection | None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.connections.discard(self)
        t = self.transport
        if t is None or t.is_closing():
            return None
        inner = self._factory()
        if client is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "proxied connection from %s via %s",
                format_address(client),
                format_address(self.peer),
            )
        inner.peer = client if client is not None else self.peer
        t.set_protocol(inner)
        inner.connection_made(t)
        if data and not t.is_closing():
            inner.data_received(data)
        return inner
