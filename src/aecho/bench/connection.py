"""One bench connection: the payloads it sends, the replies it expects, and the state it
shares with the other connections of its worker.

Every payload carries ``CONNID.SEQUENCE`` (hex) followed by a per-connection filler, so
each echoed byte is checked against what this connection sent, in order, with bytes
comparisons that run in C.  Latency runs from the moment a message was due (closed loop:
when it was sent; ``--rate``: its place in the schedule, even if it was sent late) to the
moment its last byte came back, so a stalled server cannot hide behind the messages it kept
from being sent (coordinated omission).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import monotonic_ns
from typing import cast

from aecho.bench.histogram import HIGHEST_NS, SUB_BITS, Histogram
from aecho.config import BENCH_HEADER_SIZE, BenchConfig, ConfigError, Framing
from aecho.text import plural

FILLER = bytes(range(0x21, 0x7F))  # printable, no newline: safe for --framing line
SHIFT_BASE = SUB_BITS + 1  # bucket_index's shift offset, precomputed for the hot path
NEVER = 1 << 63  # a time (ns) no message is ever due at
ERROR_KINDS = ("connect", "refused", "closed", "short", "reset", "timeout", "mismatch")


def reply_function(cfg: BenchConfig) -> Callable[[bytes], bytes] | None:
    """How to compute the expected reply to a message; None when it is the message itself.

    Raises:
        ConfigError: the handler's replies cannot be predicted with this framing.
        aecho.offload.handlers.HandlerError: the handler cannot be loaded.
    """
    if cfg.handler in ("echo", "burn"):
        return None
    from aecho.offload.handlers import load_handler

    handler = load_handler(cfg.handler)
    if cfg.framing is Framing.line:
        return lambda line: handler(line[:-1]) + b"\n"
    if cfg.handler == "upper":
        return handler  # byte by byte: the same however TCP splits the stream
    raise ConfigError(
        f"--handler {cfg.handler} replies depend on how TCP splits a raw stream, so they "
        "cannot be verified: use --framing line"
    )


def payload_parts(cfg: BenchConfig, conn_id: int) -> tuple[bytes, bytes, int]:
    """(prefix, filler, header bytes kept) of connection ``conn_id``'s payloads.

    A payload is ``prefix + "%016x" % sequence + filler``, cut to the last ``kept``
    header bytes when the message is smaller than the header.
    """
    prefix = b"%06x." % (conn_id & 0xFFFFFF)
    size = max(cfg.size - (1 if cfg.framing is Framing.line else 0), 1)
    start = conn_id % len(FILLER)
    filler = (FILLER * (size // len(FILLER) + 2))[start : start + max(0, size - BENCH_HEADER_SIZE)]
    return prefix, filler + (b"\n" if cfg.framing is Framing.line else b""), size


def reply_size(cfg: BenchConfig) -> int:
    """Bytes in the reply to one message, as bench predicts it.

    Raises:
        ConfigError, aecho.offload.handlers.HandlerError: as :func:`reply_function`.
    """
    expect = reply_function(cfg)
    if expect is None:
        return cfg.size
    prefix, filler, kept = payload_parts(cfg, 0)
    return len(expect((prefix + b"%016x" % 0)[-kept:] + filler))


class Tally:
    """What the connections of one worker share: the histogram, the counters, the phase.

    The measured window runs from ``measure_ns`` to ``window_end_ns``: the rate is the
    replies completed in it over its length.  Replies still owed when it closes are waited
    for only to count their latency and errors.
    """

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.expect = reply_function(cfg)
        self.closed_loop = cfg.rate is None
        self.fast = False  # closed-loop echo: BenchConn.data_received's inlined path
        self.engine = "python"  # "c" when the compiled loop served the run (bench.engine)
        # The compiled loop holds replies not yet added to hist: the window closes once
        # they are (bench.engine), not when told to stop.
        self.held = False
        self.remaining: int | None = None  # -n: messages still to send
        self.hist = Histogram()
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.first_errors: dict[str, str] = {}
        self.inflight = 0
        self.live = 0
        self.bytes = 0
        self.sending = False
        self.stop_asked = False
        # Replies to messages due from this time on take the inlined path in
        # BenchConn.data_received: the measurement's start while fast and sending, else never.
        self.fast_from = NEVER
        self.closing = False
        self.measure_ns = 1 << 62  # nothing counts until the start time is known
        self.last_reply_ns = 0  # when the last measured reply completed (slow path only)
        self.window_end_ns: int | None = None
        self.window_messages = 0
        self.window_bytes = 0
        self.done = asyncio.Event()
        self.stopped = asyncio.Event()
        # Messages the inlined path made in this loop iteration, written together at its
        # end by flush (see there); call_soon is the running loop's, bound by the worker.
        self.pending: list[tuple[BenchConn, bytes]] = []
        self.call_soon: Callable[[Callable[[], None]], object] = _no_loop

    def flush(self) -> None:
        """Write the messages the inlined path made, each timed from just before its write.

        Writing them after the loop has read every reply that was ready, rather than one
        by one between the reads, hands the server a burst instead of a trickle: it (and
        then bench) wakes up less often, and the kernel's wake-ups are much of what a
        message costs both sides on loopback.
        """
        batch, self.pending = self.pending, []
        for conn, payload in batch:
            if conn.lost or self.closing:
                conn.seq -= 1  # never sent
                continue
            sent_at = monotonic_ns()
            try:
                conn.write(payload)
            except RuntimeError:  # the transport closed since the reply came in
                conn.seq -= 1
                continue
            conn.out.append((payload, sent_at))

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        self.first_errors.setdefault(kind, message)

    def stop_sending(self, close_window: bool = True) -> None:
        """Send no more; with ``close_window`` the measured window ends now (the deadline,
        Ctrl-C), otherwise when the replies owed are in (-n).  Asked before sending began
        (a worker told to stop while it waits for the start), sending never begins."""
        self.stop_asked = True
        if self.sending:
            self.sending = False
            self.fast_from = NEVER
            if close_window and not self.held:
                self.close_window(monotonic_ns())
            self.stopped.set()
            if not self.inflight:
                self.done.set()

    def close_window(self, now: int) -> None:
        """End the measured window at ``now`` (once): what completed so far is the result."""
        if self.window_end_ns is None:
            self.window_end_ns = max(now, self.measure_ns)
            self.window_messages = self.hist.total
            # The inlined path counts no bytes: its replies are all cfg.size long.
            fast = self.fast
            self.window_bytes = self.window_messages * self.cfg.size if fast else self.bytes


def _no_loop(callback: Callable[[], None]) -> object:
    raise RuntimeError("no event loop to schedule on: Worker.run binds Tally.call_soon")


class BenchConn(asyncio.Protocol):
    """One connection: sends payloads, verifies the echoed stream, times each message."""

    __slots__ = (
        "failed",
        "filler",
        "hist",
        "lost",
        "off",
        "out",
        "prefix",
        "seq",
        "tail",
        "template",
        "transport",
        "w",
        "write",
    )
    write: Callable[[bytes], object]  # the transport's, bound in connection_made

    def __init__(self, tally: Tally, conn_id: int) -> None:
        self.w = tally
        cfg = tally.cfg
        self.transport: asyncio.Transport | None = None
        self.out: deque[tuple[bytes, int]] = deque()  # (expected reply, time due ns)
        self.off = 0  # bytes of out[0] already received
        self.seq = 0  # messages sent; replies received are seq - len(out)
        self.failed = False  # already counted as an error: connection_lost stays quiet
        self.lost = False
        self.prefix, self.filler, self.tail = payload_parts(cfg, conn_id)
        # One formatting operation per message: the sequence goes into a template.
        self.template = self.prefix + b"%016x" + self.filler.replace(b"%", b"%%")
        self.hist = tally.hist  # saves a lookup per message

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write  # saves a lookup per message
        self.w.live += 1

    def data_received(self, data: bytes) -> None:
        out = self.out
        if not self.off and out:
            exp, due = out[0]
            if data == exp:  # the whole reply in one piece: the common case
                out.popleft()
                w = self.w
                if due >= w.fast_from:
                    # Closed-loop echo while measuring: _complete and send, inlined,
                    # because this runs once per message and calls cost.  Message and
                    # byte counts and the timeline are derived later (Worker._sample,
                    # Tally.close_window), not kept here.  Histogram.record, inlined: a
                    # test holds the two to the same buckets.  The next message is written
                    # by Tally.flush at the end of this loop iteration.
                    now = monotonic_ns()
                    d = now - due
                    if d > HIGHEST_NS:
                        d = HIGHEST_NS
                    shift = d.bit_length() - SHIFT_BASE
                    h = self.hist
                    h.counts[(shift << SUB_BITS) + (d >> shift) if shift > 0 else d] += 1
                    if d > h.max:
                        h.max = d
                    if d < h.low:
                        h.low = d
                    h.total_ns += d
                    seq = self.seq
                    self.seq = seq + 1
                    pending = w.pending
                    if not pending:
                        w.call_soon(w.flush)
                    pending.append((self, self.template % seq))
                    return
                self._complete(exp, due)
                return
        self._data_slow(data)

    def _data_slow(self, data: bytes) -> None:
        out = self.out
        pos, n = 0, len(data)
        while pos < n:
            if not out:
                self.fail("mismatch")  # bytes nobody asked for
                return
            exp, due = out[0]
            take = min(len(exp) - self.off, n - pos)
            chunk = data if take == n else data[pos : pos + take]
            if not exp.startswith(chunk, self.off):
                self.fail("mismatch")
                return
            pos += take
            self.off += take
            if self.off == len(exp):
                out.popleft()
                self.off = 0
                self._complete(exp, due)
                if self.failed:
                    return

    def _complete(self, exp: bytes, due: int) -> None:
        """Account for a fully received reply and, in a closed loop, send the next message."""
        w = self.w
        now = monotonic_ns()
        w.inflight -= 1
        if due >= w.measure_ns:
            # Open loop, partial replies, handlers: the closed-loop echo in
            # data_received is the only path hot enough to inline this.
            self.hist.record(now - due)
            w.bytes += len(exp)
            w.last_reply_ns = now
        if w.sending:
            if w.closed_loop:
                self.send(now)
        elif not w.inflight:
            w.done.set()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        w = self.w
        w.live -= 1
        if not self.failed and not w.closing:
            w.error(*self.loss(exc))
        owed = len(self.out)
        if owed:
            w.inflight -= owed
            self.out.clear()
        if not w.live and w.sending:
            # Nothing left to send on: the run ends now.  (While connecting, the last one
            # lost may be followed by others still to come.)
            w.stop_sending()
            w.done.set()
        elif not w.inflight and not w.sending:
            w.done.set()

    def loss(self, exc: Exception | None) -> tuple[str, str]:
        """The error kind and message of this connection ending now, with ``exc``."""
        owed = len(self.out)
        if not self.seq - owed and not self.off:
            # Closed or reset before a single byte back: how a full server turns one away.
            return "refused", "the server closed the connection before any reply"
        if exc is not None:
            return "reset", f"connection reset: {exc}"
        if self.off:
            return "short", "the server closed the connection in the middle of a reply"
        if owed:
            # Between replies: in a closed loop a message is always owed then.
            owing = plural(owed, "reply", "replies")
            return "closed", f"the server closed the connection with {owing} owed"
        return "closed", "the server closed the connection"

    def fail_lost(self, exc: Exception) -> None:
        """The socket failed with ``exc`` (seen outside the transport): count it as
        connection_lost would, once, and drop the connection."""
        if self.failed or self.w.closing:
            return
        self.w.error(*self.loss(exc))
        self.failed = True
        if self.transport is not None:
            self.transport.abort()

    # sending

    def send(self, due: int) -> None:
        seq = self.seq
        self.seq = seq + 1
        w = self.w
        if self.tail < BENCH_HEADER_SIZE:
            payload = (self.prefix + b"%016x" % seq)[-self.tail :] + self.filler
        else:
            payload = self.template % seq  # one formatting, as on the fast path
        w.inflight += 1
        if due >= w.measure_ns and w.remaining is not None:
            w.remaining -= 1
            if w.remaining <= 0:
                w.stop_sending(close_window=False)
        self.out.append((payload if w.expect is None else w.expect(payload), due))
        self.write(payload)

    def fail(self, kind: str) -> None:
        """Count ``kind`` once for this connection and drop it."""
        if self.failed:
            return
        self.failed = True
        self.w.error(kind, f"{kind} on connection {self.prefix.decode()[:-1]}")
        if self.transport is not None:
            self.transport.abort()
