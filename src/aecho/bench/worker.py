"""One load-generating worker: opens its connections, paces or ping-pongs them on one event
loop, keeps the timeline, and hands back a :class:`~aecho.bench.results.WorkerResult`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic_ns
from typing import Any

from aecho.bench.connection import NEVER, BenchConn
from aecho.bench.diagnosis import (
    FULL_SERVER_SIGNS,
    connect_error,
    diagnose,
    ensure_fd_limit,
    server_fds,
)
from aecho.bench.engine import start_closed_loop
from aecho.bench.errors import BenchError
from aecho.bench.histogram import HIGHEST_NS, Histogram, bucket_index
from aecho.bench.results import TICK_NS, WorkerResult
from aecho.bench.timeline import Timeline
from aecho.config import BENCH_HEADER_SIZE, DEFAULT_HOST, DEFAULT_PORT, BenchConfig, Framing
from aecho.tls import client_context

log = logging.getLogger("aecho.bench")

PROGRESS_EVERY = 3  # ticks between progress reports
CONNECT_CONCURRENCY = 256  # half-open connects at once: more overflows small listen backlogs
# --rate: the pacer sleeps at least a timer tick (uvloop's timers count whole
# milliseconds: a shorter sleep is a 0 ms timer, and the pacer would spin between
# messages), and sends what is due within a tick early rather than late (an early
# message is timed from its real send, a late one from when it was due).
PACER_TICK_NS = 1_000_000
CPU_WINDOW_NS = 200_000_000  # the shortest window whose CPU share is reported
LATE_SHARE = 0.011  # a search step fails once this share of its replies is late (p99: 1 %)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class WorkerPlan:
    index: int
    connections: int
    first_conn_id: int
    messages: int | None
    rate: float | None
    drain_s: float  # how long replies owed at the window's end are waited for
    # A search step's p99 goal: the step stops once more than 1 % of its replies are late.
    goal_ns: int | None = None


async def sleep_until(target_ns: int) -> None:
    """Sleep until CLOCK_MONOTONIC reaches ``target_ns``, however early timers fire."""
    for _ in range(100):
        rest = target_ns - monotonic_ns()
        if rest <= 0:
            return
        await asyncio.sleep(rest / 1e9)


class Worker(Timeline):
    """Drives ``plan.connections`` connections on the running event loop."""

    def __init__(self, cfg: BenchConfig, plan: WorkerPlan, on_progress: ProgressFn | None = None):
        super().__init__(cfg)
        self.plan = plan
        self.on_progress = on_progress
        # The common case gets an inlined path in BenchConn.data_received.
        self.fast = (
            self.closed_loop
            and self.expect is None
            and plan.messages is None
            and cfg.size - (cfg.framing is Framing.line) >= BENCH_HEADER_SIZE
        )
        self.remaining = plan.messages
        self.conns: list[BenchConn] = []
        self.connect_hist = Histogram()
        self.start_unix_ns = 0  # wall clock at measure_ns: what lines up runs and machines
        self.aborted = False  # a search step stopped early: it clearly failed
        self.notes: dict[str, Any] = {}  # what diagnose found out
        # The server's descriptors, looked at when the first sign of a full server came:
        # by the end, other workers may have closed their connections already.
        self.fds_probe: asyncio.Future[tuple[int, int, int] | None] | None = None
        self.connecting: list[asyncio.Task[None]] = []  # connection attempts under way
        self.interrupted = False  # see interrupt()
        self.draining = False  # waiting for the replies owed once sending stopped
        self.hurried = False  # told to stop again: that wait is cut short (see interrupt)
        self.cut_short: str | None = None  # then: why the replies still owed failed
        self.on_wait: Callable[[float], None] | None = None  # see _drain
        self.last_progress: tuple[int, int] | None = None
        # (CLOCK_MONOTONIC, this process's CPU time) when the window opened, both in ns;
        # the share of a core this process kept busy in the window (None: never opened).
        self.cpu_from: tuple[int, int] | None = None
        self.cpu_share: float | None = None

    # connect phase

    async def connect(self) -> None:
        """Open every connection (at ``--connect-rate`` if given).

        Raises:
            BenchError: not one connection could be opened (``exc.part`` holds the
                errors counted).
            ConfigError: the --cafile cannot be loaded.
        """
        cfg = self.cfg
        ensure_fd_limit(self.plan.connections, cfg.connections, cfg.workers)
        ctx = client_context(cfg.cafile, cfg.insecure) if cfg.tls else None
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        host = cfg.host or DEFAULT_HOST
        port = DEFAULT_PORT if cfg.port is None else cfg.port

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
                    self.error(*connect_error(cfg, exc))
                    return
            self.connect_hist.record(time.monotonic_ns() - t0)
            self.conns.append(proto)

        tasks = self.connecting
        interval = self.plan.connections / cfg.connect_rate if cfg.connect_rate else 0.0
        start = time.monotonic()
        for i in range(self.plan.connections):
            if interval:
                delay = start + i * (interval / self.plan.connections) - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopped.wait(), delay)
            if self.interrupted:
                break  # Ctrl-C while connecting: what is open is measured as nothing
            tasks.append(asyncio.create_task(one(self.plan.first_conn_id + i)))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)  # interrupt() cancels
        tasks.clear()
        for outcome in outcomes:
            if isinstance(outcome, Exception):  # not a cancellation: a bug, not a refusal
                raise outcome
        if self.interrupted:
            return
        if not self.conns:
            why = self.first_errors.get("connect", f"cannot connect to {cfg.target}")
            raise BenchError(why, partial=self.result())
        # Connections the server accepted only to close them (a full connection limit)
        # show up now or with the first message; either way they are counted.
        self.conns = [c for c in self.conns if not c.lost]

    # measurement phase

    async def run(self, start_ns: int, start_unix_ns: int | None = None) -> None:
        """Measure from ``start_ns`` (CLOCK_MONOTONIC, shared by all workers) until done.

        ``start_unix_ns`` is the wall-clock time of ``start_ns``; the parent of spawned
        workers passes one reading to all, so their results line up exactly.
        """
        cfg = self.cfg
        if start_unix_ns is None:
            start_unix_ns = time.time_ns() + start_ns - monotonic_ns()
        warmup_ns = int(cfg.warmup * 1e9)
        self.measure_ns = start_ns + warmup_ns
        self.start_unix_ns = start_unix_ns + warmup_ns
        await sleep_until(start_ns)
        self.done.clear()  # connections lost while connecting may have set it
        self.call_soon = asyncio.get_running_loop().call_soon
        self.sending = True
        if self.fast:
            self.fast_from = self.measure_ns
        loop = asyncio.get_running_loop()
        loop.call_later(max(0, self.measure_ns - monotonic_ns()) / 1e9, self._open_cpu_window)
        deadline = None if cfg.duration is None else self.measure_ns + int(cfg.duration * 1e9)

        def arm_stop() -> None:
            if deadline is not None:
                self._stop_at(loop, deadline)

        if self.on_progress is not None:
            self.on_progress(self.progress(monotonic_ns()))
        ticker = asyncio.create_task(self._tick())
        pacer = None
        if not self.live or self.stop_asked:
            self.stop_sending()
        elif self.closed_loop:  # the compiled loop's task, where it takes the run
            pacer = start_closed_loop(self, self.conns, deadline, arm_stop)
        else:
            arm_stop()
            pacer = asyncio.create_task(self._pace(start_ns))
        # The hot path makes no reference cycles, but its tuples would set off a young
        # collection every few hundred messages, and a collection's pause would land in
        # the measured latencies: the cyclic collector waits until the end.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self.stopped.wait()
            if pacer is not None:  # the connections are back from the compiled loop
                await asyncio.wait([pacer])
            if not self.aborted:
                await self._drain()
        finally:
            end = monotonic_ns()
            if collecting:
                gc.enable()
            self.sending = False
            self.fast_from = NEVER
            # -n: the window ends with the last reply (or now, if none came).
            self.close_window(self.last_reply_ns or end)
            if self.aborted:
                self._book_overdue(end)
            for task in (ticker, pacer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._finish_timeline()
            self.notes = await diagnose(self.cfg, self.errors, self.hist.total, self.fds_probe)
            self.close_all()

    async def _drain(self) -> None:
        """Wait up to ``plan.drain_s`` for the replies still owed (an interrupted run tells
        ``on_wait`` first), unless told to stop again (see :meth:`interrupt`)."""
        since = monotonic_ns()
        self.draining = True
        if not self.hurried:
            if self.interrupted and not self.done.is_set() and self.on_wait is not None:
                self.on_wait(self.plan.drain_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), self.plan.drain_s)
        self.draining = False
        if self.hurried:
            waited = (monotonic_ns() - since) / 1e9
            self.cut_short = (
                f"no reply when the wait was cut short, {waited:.2f}s after sending stopped"
            )

    def _open_cpu_window(self) -> None:
        if self.window_end_ns is None:
            self.cpu_from = (monotonic_ns(), time.process_time_ns())

    def close_window(self, now: int) -> None:
        """As :meth:`Tally.close_window`, and how busy this process was in the window: a
        load generator that used its whole core may be what limited the measurement.

        The CPU is the whole process's (a server run in the same process counts too).
        A window shorter than CPU_WINDOW_NS gets no share: over a few messages it
        measures bench's own bookkeeping, not a load.
        """
        if self.window_end_ns is None and self.cpu_from is not None:
            since, cpu = self.cpu_from
            wall = monotonic_ns() - since
            if wall >= CPU_WINDOW_NS:
                self.cpu_share = (time.process_time_ns() - cpu) / wall
        super().close_window(now)

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM (or the parent's word): stop sending, and stop connecting.
        Once sending has stopped, by an earlier one or at the end of the run, one more
        cuts short the wait for the replies still owed: they count as timeouts."""
        if self.interrupted or self.draining:
            self.hurried = True
            self.done.set()
        self.interrupted = True
        self.stop_sending()
        if self.connecting:
            self.stopped.set()  # wakes connect() from its --connect-rate pause
            for task in self.connecting:
                task.cancel()

    def error(self, kind: str, message: str) -> None:
        super().error(kind, message)
        if kind in FULL_SERVER_SIGNS and self.fds_probe is None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to look with
                loop = asyncio.get_running_loop()
                self.fds_probe = loop.create_task(asyncio.to_thread(server_fds, self.cfg))

    def close_all(self) -> None:
        """Count replies still owed as timeouts (not after a step stopped early) and drop
        every connection."""
        self.closing = self.closing or self.aborted
        why = self.cut_short or f"no reply within {self.plan.drain_s:g}s"
        for conn in self.conns:
            if conn.out and not conn.failed and not conn.lost and not self.closing:
                conn.failed = True
                self.error("timeout", why)
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
            due_count = int((now + PACER_TICK_NS - start_ns) / period) + 1
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
            next_due = start_ns + int(m * period) - PACER_TICK_NS
            await asyncio.sleep(max(PACER_TICK_NS, next_due - time.monotonic_ns()) / 1e9)

    def _stop_at(self, loop: asyncio.AbstractEventLoop, deadline: int) -> None:
        # Timers may fire early (uvloop counts from when its loop iteration began): re-arm.
        rest = deadline - monotonic_ns()
        if rest > 0:
            loop.call_later(rest / 1e9, self._stop_at, loop, deadline)
        else:
            self.stop_sending()

    async def _tick(self) -> None:
        """Every TICK_NS: sample the timeline, fail connections whose oldest reply is
        overdue, stop a search step that can no longer pass, report progress."""
        timeout_ns = int(self.cfg.timeout * 1e9)
        n = 0
        while True:
            n += 1
            # Wake on the measurement's slot boundaries, so each sample closes one slot.
            ahead = (monotonic_ns() - self.measure_ns) // TICK_NS + 1
            await sleep_until(self.measure_ns + ahead * TICK_NS)
            now = monotonic_ns()
            self.sample(now)
            for conn in self.conns:
                if conn.out and not conn.failed and now - conn.out[0][1] > timeout_ns:
                    conn.fail("timeout")
            if self.plan.goal_ns is not None and self.sending and self._cannot_pass(now):
                self.aborted = True
                self.stop_sending()
            if self.on_progress is not None and n % PROGRESS_EVERY == 0 and self.sending:
                self.on_progress(self.progress(now))

    def _cannot_pass(self, now: int) -> bool:
        """A search step is lost once it saw an error, or once more replies are late (past
        the goal, or owed for longer than it) than the 1 % its p99 may have."""
        goal = self.plan.goal_ns
        rate, duration = self.plan.rate, self.cfg.duration
        if goal is None or rate is None or duration is None or now < self.measure_ns:
            return False
        if any(self.errors.values()):
            return True
        allowed = LATE_SHARE * rate * duration
        counts = self.hist.counts
        late = sum(counts[bucket_index(min(goal, HIGHEST_NS)) + 1 :])
        overdue = now - goal
        for conn in self.conns:
            for _, due in conn.out:
                if due >= overdue or late > allowed:
                    break
                if due >= self.measure_ns:
                    late += 1
        return late > allowed

    def _book_overdue(self, now: int) -> None:
        """A search step stopped early: the replies it still owed past the goal count at
        the age they had by ``now`` (the least they could still take), so its percentiles
        show the late replies that failed it rather than only the ones that came back."""
        goal = self.plan.goal_ns
        if goal is None:
            return
        record = self.hist.record
        for conn in self.conns:
            for _, due in conn.out:
                if due >= self.measure_ns and now - due > goal:
                    record(now - due)

    def progress(self, now: int) -> dict[str, Any]:
        """The live figures: replies so far, and the rate since the last call (None while
        warming up or on the first call of the window)."""
        messages = self.hist.total
        rate = None
        last = self.last_progress
        if last is not None and now > last[0] and now >= self.measure_ns:
            since, before = last if last[0] >= self.measure_ns else (self.measure_ns, 0)
            rate = (messages - before) * 1e9 / (now - since) if now > since else None
        self.last_progress = (now, messages)
        return {
            "elapsed_s": max(0, now - self.measure_ns) / 1e9,
            "warmup_left_s": max(0, self.measure_ns - now) / 1e9,
            "messages": messages,
            "rate": rate,
            "errors": sum(self.errors.values()),
            "p99_ns": self.hist.percentile(99),
            "warming": now < self.measure_ns,
        }

    def result(self) -> WorkerResult:
        end = self.window_end_ns
        return WorkerResult(
            hist=self.hist.to_dict(),
            connect_hist=self.connect_hist.to_dict(),
            errors=dict(self.errors),
            first_errors=dict(self.first_errors),
            messages=self.window_messages,
            bytes=self.window_bytes,
            sent=sum(c.seq for c in self.conns),
            connected=len(self.conns),
            start_unix_ns=self.start_unix_ns,
            window_ns=0 if end is None else end - self.measure_ns,
            timeline=list(self.timeline),
            seconds=list(self.seconds),
            aborted=self.aborted,
            notes=dict(self.notes),
            cpu=[] if self.cpu_share is None else [round(self.cpu_share, 4)],
            engine=[self.engine],
        )
