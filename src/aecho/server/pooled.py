"""The pooled protocol (``--offload process``): messages go to the worker pool, replies
leave in the order the messages arrived."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aecho.offload.outcomes import Outcome
from aecho.offload.pool import Pool
from aecho.server.connection import (
    PAUSE_CLOSING,
    PAUSE_WINDOW,
    FramedConnection,
    Host,
)
from aecho.server.framing import FrameError, RawFramer

# Messages a connection may have queued in a worker pool before it stops reading.
INFLIGHT_WINDOW = 256


class PooledConnection(FramedConnection):
    """Each submission (the messages of one read) gets a sequence number, and replies
    are written strictly in that order: a submission whose batch comes back before an
    earlier one's waits in ``_early``, and the earlier one writes it.  With more than
    INFLIGHT_WINDOW messages out, reading pauses.  Raw framing skips the framer (a
    chunk is the message, a reply goes back as it is).  In the common case, one chunk
    whose reply is next in line, nothing is kept between the read and the reply but
    the chunk itself and an int.
    """

    __slots__ = (
        "_early",
        "_encode",
        "_inflight",
        "_last_words",
        "_next_in",
        "_next_out",
        "_on_done",
        "_submit",
        "_submit_one",
    )

    def __init__(self, host: Host, pool: Pool) -> None:
        super().__init__(host)
        # Messages in the pool whose replies are not written yet.
        self._inflight = 0
        # An error line owed after the replies still in the pool (framing violation).
        self._last_words = b""
        self._next_in = 0  # sequence number of the next submission
        self._next_out = 0  # sequence number of the next submission to write
        self._early: dict[int, tuple[list[Outcome], int, int]] | None = None
        raw = isinstance(self._framer, RawFramer)
        self._encode: Callable[[bytes], bytes] | None = None if raw else self._framer.encode
        self._on_done = self._batch_done
        self._submit = pool.submit_to
        self._submit_one = pool.submit_one

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
            self._pause(PAUSE_WINDOW)
        self._submit_one(data, self._on_done, seq)

    def eof_received(self) -> bool:
        super().eof_received()
        # Keep the write side open while pooled replies are outstanding.
        return bool(self._inflight)

    @property
    def quiet(self) -> bool:
        return not self._inflight and super().quiet

    def _handle(self, messages: list[bytes]) -> None:
        seq = self._next_in
        self._next_in = seq + 1
        self._inflight += len(messages)
        if self._inflight >= INFLIGHT_WINDOW:
            self._pause(PAUSE_WINDOW)
        self._submit(messages, self._on_done, seq)

    def _refuse(self, exc: FrameError) -> None:
        if not self._inflight:
            super()._refuse(exc)
            return
        # Replies to earlier lines are still owed: the error goes after them.
        self._last_words = f"ERR {exc}\n".encode()
        self._eof = True
        self._pause(PAUSE_CLOSING)

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
        if self._paused & PAUSE_WINDOW and self._inflight < INFLIGHT_WINDOW:
            self._resume(PAUSE_WINDOW)
        if self._eof and not self._inflight:
            if self._last_words:
                self.tx += len(self._last_words)
                transport.write(self._last_words)
            transport.close()
