"""One connection: bytes in -> framer -> processor -> ordered replies out.

Hot-path rules: ``data_received`` does no timer work (idle tracking is a flag
the server's sweeper reads), and the plain raw echo gets its own class whose
``data_received`` is one write.  Reading pauses for two independent reasons
(the transport's write buffer is above its high-water mark, or too many
messages wait in a worker pool); it resumes only when neither holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from aecho.framing import FrameError, Framer, LineFramer, RawFramer
from aecho.offload import Outcome, Processor

if TYPE_CHECKING:
    from aecho.server import Server

log = logging.getLogger("aecho.connection")

# Reasons for which reading is paused (a bit mask).
_PAUSE_WRITE = 1
_PAUSE_WINDOW = 2

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
        "_paused",
        "_pending",
        "active",
        "idle_ticks",
        "peer",
        "server",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.active = False
        self.idle_ticks = 0
        self.peer: Any = None
        self._paused = 0
        self._eof = False
        self._inflight = 0
        # Pooled batches in arrival order: [message count, outcomes once they are back].
        self._pending: deque[list[Any]] | None = None
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
        self.peer = t.get_extra_info("peername")
        if not self.server.admit(self):
            t.abort()
            return
        t.set_write_buffer_limits(self.server.write_high, self.server.write_low)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        if exc is not None:
            log.debug("connection %s lost: %r", self.peer, exc)
        self._pending = None

    def eof_received(self) -> bool:
        self._eof = True
        if isinstance(self._framer, LineFramer) and self._framer.pending:
            # A last line without its terminator is still a message the peer sent.
            self._handle(self._framer.feed(b"\n"))
        # Keep the write side open while pooled replies are outstanding.
        return bool(self._pending)

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
        try:
            messages = self._framer.feed(data)
        except FrameError as exc:
            self._refuse(exc)
            return
        if messages:
            self._handle(messages)

    def _handle(self, messages: list[bytes]) -> None:
        processor = self.server.processor
        if processor.inline:
            self._handle_inline(messages)
        else:
            self._submit(processor, messages)

    def _handle_inline(self, messages: list[bytes]) -> None:
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
        transport.write(out[0] if len(out) == 1 else b"".join(out))

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
                self.transport.write(b"".join(out))
            self.transport.close()
        return False

    def _refuse(self, exc: FrameError) -> None:
        log.info("closing %s: %s", self.peer, exc)
        if self.transport is not None:
            self.transport.write(f"ERR {exc}\n".encode())
            self.transport.close()

    # -- pooled processing -------------------------------------------------------------------

    def _submit(self, processor: Processor, messages: list[bytes]) -> None:
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        entry: list[Any] = [len(messages), None]
        pending.append(entry)
        self._inflight += len(messages)
        if self._inflight >= INFLIGHT_WINDOW:
            self._pause(_PAUSE_WINDOW)
        processor.submit_to(messages, self._batch_done, entry)

    def _batch_done(self, entry: list[Any], outcomes: list[Outcome]) -> None:
        entry[1] = outcomes
        pending = self._pending
        transport = self.transport
        if pending is None or transport is None or transport.is_closing():
            return
        if pending[0] is not entry:
            return  # an earlier batch is still out; it writes this one when it is back
        encode = self._framer.encode
        out: list[bytes] = []
        # Replies leave in arrival order: only a finished head of the queue is written.
        while pending and pending[0][1] is not None:
            count, done = pending.popleft()
            self._inflight -= count
            for outcome in done:
                if isinstance(outcome, BaseException):
                    if not self._handler_failed(outcome, out):
                        return
                else:
                    out.append(encode(outcome))
            self.server.stats.messages += count
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._inflight < INFLIGHT_WINDOW:
            self._resume(_PAUSE_WINDOW)
        if self._eof and not pending:
            transport.close()

    # -- server-side control -----------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """Nothing owed to the peer: no queued work and nothing left to write."""
        t = self.transport
        return not self._pending and (t is None or t.get_write_buffer_size() == 0)

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
        self.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._eof = True
        return False
