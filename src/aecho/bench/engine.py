"""The load generator: connections, pacing, verification.

One :class:`Worker` drives its share of the connections on one event loop.
``--workers W`` runs W of them in spawned processes and merges their results
exactly (counters and histogram counts are added).

Every payload carries ``CONNID.SEQUENCE`` (hex) followed by a per-connection
filler, so each echoed byte is checked against what this connection sent, in
order, with bytes comparisons that run in C.  Latency runs from the moment a
message was due (closed loop: when it was sent; ``--rate``: its place in the
schedule, even if the generator sent it late) to the moment its last byte came
back, so a stalled server cannot hide behind the messages it kept from being
sent (coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from time import monotonic_ns
from typing import Any, cast

from aecho.bench.stats import HIGHEST_NS, SUB_BITS, Histogram
from aecho.config import BENCH_HEADER_SIZE, BenchConfig, ConfigError, Framing

log = logging.getLogger("aecho.bench")

TICK_NS = 100_000_000  # timeline resolution and timeout scan interval
PROGRESS_EVERY = 3  # ticks between progress reports
FD_SLACK = 64  # descriptors a bench process needs besides its connections
CONNECT_CONCURRENCY = 256  # half-open connects at once: more overflows small listen backlogs
PACER_EARLY_NS = 500_000  # --rate: send up to this early rather than wake for each message
FILLER = bytes(range(0x21, 0x7F))  # printable, no newline: safe for --framing line
LISTENING = re.compile(r"listening on (\[[^\]]+\]|[^\s:]+):(\d+)")
SHIFT_BASE = SUB_BITS + 1  # bucket_index's shift offset, precomputed for the hot path
NEVER = 1 << 63  # a time (ns) no message is ever due at
ERROR_KINDS = ("connect", "refused", "closed", "short", "reset", "timeout", "mismatch")


class BenchError(RuntimeError):
    """The bench cannot run or went wrong as a whole; str() is the one-line message."""


# -- payloads --------------------------------------------------------------------------------------


def reply_function(cfg: BenchConfig) -> Callable[[bytes], bytes] | None:
    """How to compute the expected reply to a message; None when it is the message itself.

    Raises:
        ConfigError: the handler's replies cannot be predicted with this framing.
        aecho.handlers.HandlerError: the handler cannot be loaded.
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


async def _sleep_until(target_ns: int) -> None:
    """Sleep until CLOCK_MONOTONIC reaches ``target_ns``, however early timers fire."""
    for _ in range(100):
        rest = target_ns - monotonic_ns()
        if rest <= 0:
            return
        await asyncio.sleep(rest / 1e9)


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- one connection --------------------------------------------------------------------------------


class BenchConn(asyncio.Protocol):
    """One connection: sends payloads, verifies the echoed stream, times each message."""

    write: Callable[[bytes], object]  # the transport's, bound in connection_made

    def __init__(self, worker: Worker, conn_id: int) -> None:
        self.w = worker
        self.transport: asyncio.Transport | None = None
        self.out: deque[tuple[bytes, int]] = deque()  # (expected reply, time due ns)
        self.off = 0  # bytes of out[0] already received
        self.seq = 0  # messages sent; replies received are seq - len(out)
        self.failed = False  # already counted as an error: connection_lost stays quiet
        self.lost = False
        self.prefix = b"%06x." % (conn_id & 0xFFFFFF)
        size = worker.cfg.size - (1 if worker.cfg.framing is Framing.line else 0)
        size = max(size, 1)
        self.tail = size  # header bytes kept when the payload is smaller than the header
        start = conn_id % len(FILLER)
        filler = (FILLER * (size // len(FILLER) + 2))[
            start : start + max(0, size - BENCH_HEADER_SIZE)
        ]
        self.filler = filler + (b"\n" if worker.cfg.framing is Framing.line else b"")
        # One formatting operation per message: the sequence goes into a template.
        self.template = self.prefix + b"%016x" + self.filler.replace(b"%", b"%%")
        self.hist = worker.hist  # saves a lookup per message

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
                if due >= self.w.fast_from:
                    # Closed-loop echo while measuring: _complete and send, inlined,
                    # because this runs once per message and calls cost.  Message and
                    # byte counts and the timeline are derived later (Worker.sample_timeline,
                    # Worker.result), not kept here.
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
                    payload = self.template % seq
                    out.append((payload, now))
                    self.write(payload)
                    return
                self._complete(exp, due)
                return
        self._data_slow(data)

    def _data_slow(self, data: bytes) -> None:
        out = self.out
        pos, n = 0, len(data)
        while pos < n:
            if not out:
                self._fail("mismatch")  # bytes nobody asked for
                return
            exp, due = out[0]
            take = min(len(exp) - self.off, n - pos)
            chunk = data if take == n else data[pos : pos + take]
            if not exp.startswith(chunk, self.off):
                self._fail("mismatch")
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
        owed = len(self.out)
        replies = self.seq - owed
        if owed:
            w.inflight -= owed
            self.out.clear()
        if not self.failed and not w.closing:
            if not replies:
                # Closed or reset before a single reply: how a full server turns one away.
                w.error("refused", "the server closed the connection before any reply")
            elif exc is not None:
                w.error("reset", f"connection reset: {exc}")
            elif owed:
                w.error("short", "the server closed the connection with replies owed")
            else:
                w.error("closed", "the server closed the connection")
        if (not w.inflight and not w.sending) or not w.live:
            w.done.set()

    # sending

    def send(self, due: int) -> None:
        seq = self.seq
        self.seq = seq + 1
        w = self.w
        header = self.prefix + b"%016x" % seq
        if self.tail < BENCH_HEADER_SIZE:
            header = header[-self.tail :]
        payload = header + self.filler
        w.inflight += 1
        if due >= w.measure_ns and w.remaining is not None:
            w.remaining -= 1
            if w.remaining <= 0:
                w.stop_sending()
        self.out.append((payload if w.expect is None else w.expect(payload), due))
        assert self.transport is not None
        self.transport.write(payload)

    def _fail(self, kind: str) -> None:
        if self.failed:
            return
        self.failed = True
        self.w.error(kind, f"{kind} on connection {self.prefix.decode()[:-1]}")
        if self.transport is not None:
            self.transport.abort()


# -- one worker ------------------------------------------------------------------------------------


@dataclass
class WorkerPlan:
    index: int
    connections: int
    first_conn_id: int
    messages: int | None
    rate: float | None


@dataclass
class WorkerResult:
    """What one worker measured; picklable so workers can send it to the parent."""

    hist: dict[str, Any]
    connect_hist: dict[str, Any]
    errors: dict[str, int]
    first_errors: dict[str, str]
    messages: int
    bytes: int
    sent: int
    connected: int
    measure_ns: int
    end_ns: int
    timeline: list[int]


def build_ssl_context(cfg: BenchConfig) -> ssl.SSLContext | None:
    """The client TLS context asked for, or None.

    Raises:
        BenchError: the CA file cannot be read.
    """
    if not cfg.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=cfg.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise BenchError(f"cannot load --cafile {cfg.cafile}: {exc}") from exc
    if cfg.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def ensure_fd_limit(connections: int, total: int, workers: int) -> None:
    """Raise the soft descriptor limit if this process needs more; fail if it cannot.

    Raises:
        BenchError: the hard limit is too low for ``connections`` sockets.
    """
    need = connections + FD_SLACK
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
    more = " or spread them over more --workers" if workers < total else ""
    raise BenchError(
        f"-c {total} needs about {need} file descriptors per process but the limit is "
        f"{soft} (hard {hard}): raise it with 'ulimit -n {need}' (as root, or "
        f"LimitNOFILE= for a service){more}"
    )


def _connect_error(cfg: BenchConfig, exc: BaseException) -> tuple[str, str]:
    """(kind, one-line message) for a failed connect."""
    target = cfg.target
    if isinstance(exc, ConnectionRefusedError) or (isinstance(exc, FileNotFoundError) and cfg.unix):
        return (
            "connect",
            f"nothing is listening on {target}: start 'aecho serve' or check the address",
        )
    if isinstance(exc, TimeoutError):
        return "connect", f"connecting to {target} timed out after {cfg.timeout:g}s"
    if isinstance(exc, ssl.SSLError):
        return "connect", f"TLS handshake with {target} failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            return "connect", (
                f"out of file descriptors (limit {soft}): raise it with 'ulimit -n', "
                "or use fewer connections per --workers"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return "connect", (
                f"out of local ports for connections to {target}: use fewer connections "
                "(see net.ipv4.ip_local_port_range)"
            )
        if isinstance(exc, socket.gaierror):
            return "connect", f"cannot resolve {cfg.host!r}: {exc.strerror}"
        return "connect", f"cannot connect to {target}: {exc.strerror or exc}"
    return "connect", f"cannot connect to {target}: {exc}"


class Worker:
    """Drives ``plan.connections`` connections on the running event loop."""

    def __init__(
        self,
        cfg: BenchConfig,
        plan: WorkerPlan,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.on_progress = on_progress
        self.expect = reply_function(cfg)
        self.closed_loop = plan.rate is None
        # The common case gets an inlined path in BenchConn.data_received.
        self.fast = (
            self.closed_loop
            and self.expect is None
            and plan.messages is None
            and cfg.size - (cfg.framing is Framing.line) >= BENCH_HEADER_SIZE
        )
        self.remaining: int | None = plan.messages
        self.conns: list[BenchConn] = []
        self.hist = Histogram()
        self.connect_hist = Histogram()
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.first_errors: dict[str, str] = {}
        self.inflight = 0
        self.live = 0
        self.bytes = 0
        self.sent_measured = 0
        self.sending = False
        # Replies to messages due from this time on take the inlined path in
        # BenchConn.data_received: the measurement's start while fast and sending, else never.
        self.fast_from = NEVER
        self.closing = False
        self.measure_ns = 1 << 62  # nothing counts until the start time is known
        self.end_ns = 0
        # Replies completed per TICK_NS slot of the measurement (for the throughput plot),
        # sampled from the histogram's total at each slot's end by _tick.
        self.timeline: list[int] = []
        self.done = asyncio.Event()
        self.stopped = asyncio.Event()

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        self.first_errors.setdefault(kind, message)

    def stop_sending(self) -> None:
        if self.sending:
            self.sending = False
            self.fast_from = NEVER
            self.stopped.set()
            if not self.inflight:
                self.done.set()

    # connect phase

    async def connect(self) -> None:
        """Open every connection (at ``--connect-rate`` if given).

        Raises:
            BenchError: not one connection could be opened.
        """
        cfg = self.cfg
        ensure_fd_limit(self.plan.connections, cfg.connections, cfg.workers)
        ctx = build_ssl_context(cfg)
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        host = cfg.host or "127.0.0.1"
        port = 7007 if cfg.port is None else cfg.port

        async def one(conn_id: int) -> None:
            proto = BenchConn(self, conn_id)
            async with gate:
                t0 = time.monotonic_ns()
                try:
                    async with asyncio.timeout(cfg.timeout):
                        if cfg.unix:
                            await loop.create_unix_connection(lambda: proto, cfg.unix)
                        else:
                            await loop.create_connection(
                                lambda: proto,
                                host,
                                port,
                                ssl=ctx,
                                server_hostname=host if ctx is not None else None,
                            )
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    log.debug("connect failed", exc_info=True)
                    self.error(*_connect_error(cfg, exc))
                    return
            self.connect_hist.record(time.monotonic_ns() - t0)
            self.conns.append(proto)

        tasks = []
        interval = self.plan.connections / cfg.connect_rate if cfg.connect_rate else 0.0
        start = time.monotonic()
        for i in range(self.plan.connections):
            if interval:
                delay = start + i * (interval / self.plan.connections) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(self.plan.first_conn_id + i)))
        await asyncio.gather(*tasks)
        if not self.conns:
            raise BenchError(self.first_errors.get("connect", f"cannot connect to {cfg.target}"))
        # Connections the server accepted only to close them (a full connection limit)
        # show up now or with the first message; either way they are counted.
        self.conns = [c for c in self.conns if not c.lost]

    # measurement phase

    async def run(self, start_ns: int) -> None:
        """Measure from ``start_ns`` (CLOCK_MONOTONIC, shared by all workers) until done."""
        cfg = self.cfg
        self.measure_ns = start_ns + int(cfg.warmup * 1e9)
        await _sleep_until(start_ns)
        self.done.clear()  # connections lost while connecting may have set it
        self.sending = True
        if self.fast:
            self.fast_from = self.measure_ns
        loop = asyncio.get_running_loop()
        if cfg.duration is not None:
            deadline = self.measure_ns + int(cfg.duration * 1e9)
            self._stop_at(loop, deadline)
        if self.on_progress is not None:
            self.on_progress(self.progress(monotonic_ns()))
        ticker = asyncio.create_task(self._tick())
        pacer = None
        if self.closed_loop:
            now = time.monotonic_ns()
            for _ in range(cfg.pipeline):
                for conn in self.conns:
                    if self.sending and not conn.lost:
                        conn.send(now)
        else:
            pacer = asyncio.create_task(self._pace(start_ns))
        if not self.live:
            self.done.set()
        try:
            await self.stopped.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), cfg.timeout)
        finally:
            self.end_ns = time.monotonic_ns()
            self.sending = False
            self.fast_from = NEVER
            for task in (ticker, pacer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._finish_timeline()
            self._close_all()

    def _finish_timeline(self) -> None:
        """Book the replies since the last sample and trim the timeline to the run."""
        timeline = self.timeline
        used = -(-(self.end_ns - self.measure_ns) // TICK_NS)
        if self.cfg.duration is not None:
            used = -(-int(self.cfg.duration * 1e9) // TICK_NS)
        if used <= 0:
            timeline.clear()
            return
        # Replies since the last sample completed by the end: they go in its slot.
        end_slot = max((self.end_ns - self.measure_ns) // TICK_NS, len(timeline), 0)
        timeline.extend([0] * (max(end_slot + 1, used) - len(timeline)))
        timeline[end_slot] += self.hist.total - sum(timeline)
        # Replies drained after the deadline count in the last slot of the run.
        timeline[used - 1 :] = [sum(timeline[used - 1 :])]

    def _close_all(self) -> None:
        # Replies still owed after the grace period are timeouts.
        for conn in self.conns:
            if conn.out and not conn.failed and not conn.lost:
                conn.failed = True
                self.error("timeout", f"no reply within {self.cfg.timeout:g}s")
        self.closing = True
        for conn in self.conns:
            if conn.transport is not None and not conn.lost:
                conn.transport.abort()

    async def _pace(self, start_ns: int) -> None:
        """Open loop: message m is due at start + m/rate, on connection m mod C."""
        rate = self.plan.rate
        assert rate is not None
        conns = self.conns
        period = 1e9 / rate
        m = 0
        k = 0
        while self.sending:
            now = time.monotonic_ns()
            due_count = int((now + PACER_EARLY_NS - start_ns) / period) + 1
            while m < due_count and self.sending:
                due = start_ns + int(m * period)
                for _ in range(len(conns)):
                    conn = conns[k % len(conns)]
                    k += 1
                    if not conn.lost and not conn.failed:
                        # Sent early: time from the real send; late: from when it was due.
                        conn.send(min(due, now))
                        break
                else:
                    self.stop_sending()
                    return
                m += 1
            next_due = start_ns + int(m * period) - PACER_EARLY_NS
            await asyncio.sleep(max(0.0, (next_due - time.monotonic_ns()) / 1e9))

    def _stop_at(self, loop: asyncio.AbstractEventLoop, deadline: int) -> None:
        # Timers may fire early (uvloop counts from when its loop iteration began): re-arm.
        rest = deadline - monotonic_ns()
        if rest > 0:
            loop.call_later(rest / 1e9, self._stop_at, loop, deadline)
        else:
            self.stop_sending()

    async def _tick(self) -> None:
        """Every TICK_NS: sample the timeline, fail connections whose oldest reply is
        overdue, report progress."""
        timeout_ns = int(self.cfg.timeout * 1e9)
        n = 0
        while True:
            n += 1
            # Wake on the measurement's slot boundaries, so each sample closes one slot.
            ahead = (monotonic_ns() - self.measure_ns) // TICK_NS + 1
            await _sleep_until(self.measure_ns + ahead * TICK_NS)
            now = monotonic_ns()
            self.sample_timeline(now)
            for conn in self.conns:
                if conn.out and now - conn.out[0][1] > timeout_ns and not conn.failed:
                    conn._fail("timeout")
            if self.on_progress is not None and n % PROGRESS_EVERY == 0:
                self.on_progress(self.progress(now))

    def sample_timeline(self, now: int) -> None:
        """Put the replies counted since the last sample in the slot that just ended.

        A late wake-up books them in the last slot it spans, leaving the skipped ones at 0.
        """
        ended = (now - self.measure_ns) // TICK_NS  # slots wholly in the past
        timeline = self.timeline
        if ended <= len(timeline):
            return
        timeline.extend([0] * (ended - len(timeline)))
        timeline[-1] = self.hist.total - sum(timeline)

    def progress(self, now: int) -> dict[str, Any]:
        return {
            "elapsed_s": max(0, now - self.measure_ns) / 1e9,
            "messages": self.hist.total,
            "errors": sum(self.errors.values()),
            "p99_ns": self.hist.percentile(99),
            "warming": now < self.measure_ns,
        }

    def result(self) -> WorkerResult:
        return WorkerResult(
            hist=self.hist.to_dict(),
            connect_hist=self.connect_hist.to_dict(),
            errors=dict(self.errors),
            first_errors=dict(self.first_errors),
            messages=self.hist.total,
            # Closed-loop echo replies all have the configured size: the fast path
            # leaves them out of self.bytes.
            bytes=self.hist.total * self.cfg.size if self.fast else self.bytes,
            sent=sum(c.seq for c in self.conns),
            connected=len(self.conns),
            measure_ns=self.measure_ns,
            end_ns=self.end_ns,
            timeline=list(self.timeline),
        )


# -- merged results --------------------------------------------------------------------------------


@dataclass
class Result:
    cfg: BenchConfig
    hist: Histogram
    connect_hist: Histogram
    errors: dict[str, int]
    first_errors: dict[str, str]
    messages: int
    bytes: int
    connected: int
    duration_s: float
    timeline: list[int]
    interrupted: bool = False
    server_pid: int | None = None  # the embedded server's, once stopped
    workers: list[WorkerResult] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind != "mismatch")

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.duration_s / (1 << 20) if self.duration_s > 0 else 0.0

    @classmethod
    def merge(
        cls, cfg: BenchConfig, parts: list[WorkerResult], interrupted: bool = False
    ) -> Result:
        errors = dict.fromkeys(ERROR_KINDS, 0)
        first: dict[str, str] = {}
        timeline: list[int] = []
        for p in parts:
            for kind, n in p.errors.items():
                errors[kind] += n
            for kind, msg in p.first_errors.items():
                first.setdefault(kind, msg)
            timeline.extend([0] * (len(p.timeline) - len(timeline)))
            for i, n in enumerate(p.timeline):
                timeline[i] += n
        start = min(p.measure_ns for p in parts)
        end = max(p.end_ns for p in parts)
        return cls(
            cfg=cfg,
            hist=Histogram.merged(Histogram.from_dict(p.hist) for p in parts),
            connect_hist=Histogram.merged(Histogram.from_dict(p.connect_hist) for p in parts),
            errors=errors,
            first_errors=first,
            messages=sum(p.messages for p in parts),
            bytes=sum(p.bytes for p in parts),
            connected=sum(p.connected for p in parts),
            duration_s=max(0, end - start) / 1e9,
            timeline=timeline,
            interrupted=interrupted,
            workers=parts,
        )


# -- running ---------------------------------------------------------------------------------------


def plans(cfg: BenchConfig) -> list[WorkerPlan]:
    conns = split(cfg.connections, cfg.workers)
    msgs = split(cfg.messages, cfg.workers) if cfg.messages is not None else None
    out = []
    first = 0
    for i, c in enumerate(conns):
        out.append(
            WorkerPlan(
                index=i,
                connections=c,
                first_conn_id=first,
                messages=msgs[i] if msgs is not None else None,
                rate=cfg.rate * c / cfg.connections if cfg.rate is not None else None,
            )
        )
        first += c
    return out


ProgressFn = Callable[[dict[str, Any]], None]


def run(cfg: BenchConfig, on_progress: ProgressFn | None = None) -> Result:
    """Run the whole measurement: in this process for one worker, spawned processes for more.

    Raises:
        BenchError: nothing could be measured (with the one-line reason).
        ConfigError: the options cannot be honoured (e.g. an unverifiable handler).
    """
    reply_function(cfg)  # fail on an unverifiable handler before connecting anything
    if cfg.workers == 1:
        return _run_inline(cfg, plans(cfg)[0], on_progress)
    return _run_spawned(cfg, on_progress)


def _run_inline(cfg: BenchConfig, plan: WorkerPlan, on_progress: ProgressFn | None) -> Result:
    from aecho.loops import run as run_loop

    interrupted = False

    async def main() -> WorkerResult:
        nonlocal interrupted
        worker = Worker(cfg, plan, on_progress)
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            worker.stop_sending()

        await worker.connect()
        installed = _add_stop_signals(loop, on_sigint)
        try:
            await worker.run(time.monotonic_ns())
        finally:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous)  # remove_signal_handler would leave SIG_DFL
        return worker.result()

    part = run_loop(main(), cfg.loop)
    return Result.merge(cfg, [part], interrupted)


async def measure(cfg: BenchConfig, on_progress: ProgressFn | None = None) -> Result:
    """One worker with all the connections, on the running loop (no Ctrl-C handling).

    Raises:
        BenchError: not one connection could be opened.
        ConfigError: the handler's replies cannot be verified with this framing.
    """
    worker = Worker(cfg, plans(replace(cfg, workers=1))[0], on_progress)
    await worker.connect()
    await worker.run(monotonic_ns())
    return Result.merge(cfg, [worker.result()])


def _add_stop_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> list[tuple[signal.Signals, Any]]:
    """Make SIGINT and SIGTERM stop the measurement early; return what to restore."""
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, callback)
        except (ValueError, RuntimeError, NotImplementedError):
            break  # not the main thread: signals are the caller's business
        installed.append((sig, previous))
    return installed


def worker_main(
    conn: multiprocessing.connection.Connection, cfg: BenchConfig, plan: WorkerPlan
) -> None:
    """Entry point of a spawned worker: connect, report, wait for "go", measure, report."""
    from aecho.loops import run as run_loop

    # Ctrl-C reaches the whole process group; the parent decides and tells us to stop
    # (and if the parent dies, the pipe's EOF stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def main() -> None:
        def progress(p: dict[str, Any]) -> None:
            conn.send(("progress", plan.index, p))

        worker = Worker(cfg, plan, progress)
        try:
            await worker.connect()
        except (BenchError, ConfigError) as exc:
            conn.send(("fatal", plan.index, str(exc)))
            return
        conn.send(("connected", plan.index, len(worker.conns)))
        loop = asyncio.get_running_loop()
        go: asyncio.Future[int] = loop.create_future()

        def readable() -> None:
            try:
                msg = conn.recv()
            except EOFError:
                msg = ("stop",)
            if msg[0] == "go" and not go.done():
                go.set_result(msg[1])
            elif msg[0] == "stop":
                if not go.done():
                    go.set_result(-1)
                worker.stop_sending()

        loop.add_reader(conn.fileno(), readable)
        start = await go
        if start >= 0:
            await worker.run(start)
        else:
            worker.closing = True
            worker._close_all()
        loop.remove_reader(conn.fileno())
        conn.send(("result", plan.index, worker.result()))

    try:
        run_loop(main(), cfg.loop)
    finally:
        conn.close()


def _run_spawned(cfg: BenchConfig, on_progress: ProgressFn | None) -> Result:
    # Spawn, not fork: the parent may hold threads, and nothing forks a process
    # that could be running an event loop.
    ctx = multiprocessing.get_context("spawn")
    worker_plans = plans(cfg)
    pipes: list[multiprocessing.connection.Connection] = []
    procs = []
    for plan in worker_plans:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child, cfg, plan), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    results: dict[int, WorkerResult] = {}
    progress: dict[int, dict[str, Any]] = {}
    interrupted = False
    try:
        connected = 0
        fatal: str | None = None
        waiting = set(range(len(pipes)))
        while waiting:
            ready = multiprocessing.connection.wait([pipes[i] for i in waiting], 60 + cfg.timeout)
            if not ready:
                raise BenchError("workers did not finish connecting in time")
            for p in ready:
                i = pipes.index(p)  # type: ignore[arg-type]
                try:
                    msg = pipes[i].recv()
                except EOFError:
                    fatal = fatal or f"worker {i} exited while connecting"
                    waiting.discard(i)
                    continue
                waiting.discard(i)
                if msg[0] == "fatal":
                    fatal = fatal or msg[2]
                else:
                    connected += msg[2]
        if fatal is not None and not connected:
            raise BenchError(fatal)
        start = time.monotonic_ns() + 50_000_000
        for p in pipes:
            with contextlib.suppress(OSError):
                p.send(("go", start))
        pending = set(range(len(pipes)))
        while pending:
            try:
                for p in multiprocessing.connection.wait([pipes[i] for i in pending], 0.5):
                    i = pipes.index(p)  # type: ignore[arg-type]
                    try:
                        msg = pipes[i].recv()
                    except EOFError:
                        pending.discard(i)
                        continue
                    if msg[0] == "progress":
                        progress[i] = msg[2]
                        if on_progress is not None:
                            on_progress(_merge_progress(list(progress.values())))
                    elif msg[0] in ("result", "fatal"):
                        if msg[0] == "result":
                            results[i] = msg[2]
                        pending.discard(i)
            except KeyboardInterrupt:
                # Workers ignore SIGINT: they stop sending, drain and report when told.
                interrupted = True
                for i in pending:
                    with contextlib.suppress(OSError):
                        pipes[i].send(("stop",))
    finally:
        for p in pipes:
            with contextlib.suppress(OSError):
                p.send(("stop",))
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for p in pipes:
            p.close()
    if not results:
        raise BenchError("no worker reported a result")
    return Result.merge(cfg, [results[i] for i in sorted(results)], interrupted)


def _merge_progress(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "elapsed_s": max(p["elapsed_s"] for p in parts),
        "messages": sum(p["messages"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "p99_ns": max(p["p99_ns"] for p in parts),  # progress only: the final p99 is exact
        "warming": any(p["warming"] for p in parts),
    }


# -- the embedded server ---------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_server(
    cfg: BenchConfig, ready_timeout: float = 60.0
) -> Iterator[tuple[str, int, int]]:
    """``aecho serve --port 0`` in a subprocess; yields its (host, port, pid), then stops it.

    Raises:
        BenchError: the server exited or did not report readiness in time.
    """
    args = [
        sys.executable,
        "-m",
        "aecho",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--offload",
        cfg.offload.value,
        "--handler",
        cfg.handler,
        "--framing",
        cfg.framing.value,
        "--max-connections",
        str(max(cfg.connections + 16, 10_000)),
        "--log-level",
        "info",
    ]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as logf:
        # A new session: Ctrl-C at the terminal is for bench, which then stops the server itself.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            start_new_session=True,
        )
        try:
            host, port = _wait_listening(proc, logf, ready_timeout)
            yield host, port, proc.pid
        finally:
            _stop_server(proc)


def _wait_listening(proc: subprocess.Popen[bytes], logf: Any, timeout: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        logf.seek(0)
        text = logf.read()
        if m := LISTENING.search(text):
            return m.group(1).strip("[]"), int(m.group(2))
        if proc.poll() is not None:
            last = [line for line in text.splitlines() if line.strip()]
            why = last[-1] if last else f"exit status {proc.returncode}"
            raise BenchError(f"the embedded server did not start: {why}")
        if time.monotonic() > deadline:
            raise BenchError(f"the embedded server did not report readiness in {timeout:g}s")
        # The readiness line is written to a file, so poll it (briefly) for the line.
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
