"""One load-generating worker: opens its connections, paces or ping-pongs them on one event
loop, keeps the timeline, and hands back a :class:`~aecho.bench.results.WorkerResult`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic_ns
from typing import Any

from aecho.bench import BenchError
from aecho.bench.connection import NEVER, BenchConn, Tally
from aecho.bench.diagnosis import connect_error
from aecho.bench.histogram import Histogram
from aecho.bench.results import WorkerResult
from aecho.config import BENCH_HEADER_SIZE, BenchConfig, Framing

log = logging.getLogger("aecho.bench")

TICK_NS = 100_000_000  # timeline resolution and timeout scan interval
PROGRESS_EVERY = 3  # ticks between progress reports
FD_SLACK = 64  # descriptors a bench process needs besides its connections
CONNECT_CONCURRENCY = 256  # half-open connects at once: more overflows small listen backlogs
PACER_EARLY_NS = 500_000  # --rate: send up to this early rather than wake for each message

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class WorkerPlan:
    index: int
    connections: int
    first_conn_id: int
    messages: int | None
    rate: float | None


async def sleep_until(target_ns: int) -> None:
    """Sleep until CLOCK_MONOTONIC reaches ``target_ns``, however early timers fire."""
    for _ in range(100):
        rest = target_ns - monotonic_ns()
        if rest <= 0:
            return
        await asyncio.sleep(rest / 1e9)


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


class Worker(Tally):
    """Drives ``plan.connections`` connections on the running event loop."""

    def __init__(self, cfg: BenchConfig, plan: WorkerPlan, on_progress: ProgressFn | None = None):
        super().__init__(cfg)
        self.plan = plan
        self.on_progress = on_progress
        self.closed_loop = plan.rate is None
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
        self.end_ns = 0
        # Replies completed per TICK_NS slot of the measurement (for the throughput plot),
        # sampled from the histogram's total at each slot's end by _tick.
        self.timeline: list[int] = []

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
                    self.error(*connect_error(cfg, exc))
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
        await sleep_until(start_ns)
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
            self.close_all()

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

    def close_all(self) -> None:
        """Count replies still owed as timeouts and drop every connection."""
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
            await sleep_until(self.measure_ns + ahead * TICK_NS)
            now = monotonic_ns()
            self.sample_timeline(now)
            for conn in self.conns:
                if conn.out and now - conn.out[0][1] > timeout_ns and not conn.failed:
                    conn.fail("timeout")
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
