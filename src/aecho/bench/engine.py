"""The closed-loop echo while it sends, in C where that was built (aecho.bench._engine).

Per message, one bench process in Python spends several microseconds above the kernel's
share, and that made bench, not the server, the limit against a fast server.  So while a
closed-loop echo run sends (warm-up and measured window), the compiled loop serves its
connections: it reads, compares every byte with the reply expected, records the latency
in the same histogram buckets and writes the next message, as BenchConn.data_received's
inlined path does.  Python keeps the rest: connecting, the stop, signals, progress and
the timeline (after every slice of at most one timeline tick), the wait for the replies
still owed once sending stops, and every connection that ends, fails or falls silent,
which the loop hands back to be counted as the Python path counts it.

Runs with ``--rate``, ``-n``, TLS, or a handler whose replies differ from the messages
stay in Python.  ``AECHO_BENCH_ENGINE=python`` keeps every run there (to compare, or to
rule the compiled loop out); ``--json`` says which one ran (``bench_engine``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from time import monotonic_ns
from types import ModuleType
from typing import TYPE_CHECKING

from aecho.bench.connection import BenchConn, Tally
from aecho.bench.histogram import BUCKETS, EMPTY_LOW, HIGHEST_NS, SUB_BITS, Histogram
from aecho.bench.results import TICK_NS
from aecho.bench.timeline import Timeline

if TYPE_CHECKING:
    from aecho.bench._engine import Engine

ENGINE_ENV = "AECHO_BENCH_ENGINE"
HANDOVER_TRIES = 1000  # loop iterations to wait for every write to go out first

_compiled: ModuleType | None
try:
    import aecho.bench._engine as _compiled
except ImportError:  # not built (no C compiler at install, not Linux)
    _compiled = None


def compiled() -> ModuleType | None:
    """The compiled loop's module, or None where it was not built."""
    return _compiled


def takes(t: Tally) -> bool:
    """Whether the compiled loop serves this run's connections while it sends."""
    wanted = os.environ.get(ENGINE_ENV, "").strip().lower()
    return t.fast and not t.cfg.tls and _compiled is not None and wanted != "python"


def start_closed_loop(
    t: Timeline, conns: list[BenchConn], deadline: int | None, arm_stop: Callable[[], None]
) -> asyncio.Task[None] | None:
    """Send each connection's first ``--pipeline`` messages and ``arm_stop`` (the
    deadline's timer); then, where the compiled loop takes the run, hand the connections
    to it in a task, which ends once they are back.  The loop's slices end at
    ``deadline`` too, and a stop while it holds replies closes the window only once they
    are counted (``Tally.held``)."""
    now = monotonic_ns()
    for _ in range(t.cfg.pipeline):
        for conn in conns:
            if t.sending and not conn.lost:
                conn.send(now)
    arm_stop()
    if not t.sending or not takes(t):
        return None
    return asyncio.create_task(_drive(t, conns, deadline))


def _ready(t: Tally, conns: list[BenchConn]) -> bool:
    """Nothing made and not yet written: the loop can take the descriptors over."""
    return not t.pending and all(
        c.lost or c.failed or c.transport is None or not c.transport.get_write_buffer_size()
        for c in conns
    )


async def _drive(t: Timeline, conns: list[BenchConn], deadline: int | None) -> None:
    """Serve ``conns`` in the compiled loop, in slices that end on the timeline's ticks
    (and at ``deadline``), each in a thread so the event loop keeps turning: the Python
    path's own connections, a server in the same process, signals, progress."""
    assert _compiled is not None
    for _ in range(HANDOVER_TRIES):
        if _ready(t, conns) or not t.sending:
            break
        await asyncio.sleep(0)
    members = [  # one already closing (end of file read, say) stays in Python
        c
        for c in conns
        if not c.lost and not c.failed and c.transport is not None and not c.transport.is_closing()
    ]
    if not t.sending or not members or not _ready(t, conns):
        return
    engine = _compiled.Engine(
        [c.transport.get_extra_info("socket").fileno() for c in members if c.transport],
        [c.template % 0 for c in members],
        len(members[0].prefix),
        max(t.cfg.pipeline, *(len(c.out) for c in members)),
        SUB_BITS,
        HIGHEST_NS,
        BUCKETS,
    )
    loop = asyncio.get_running_loop()
    active: dict[int, BenchConn] = {}
    t.engine = "c"
    t.held = True
    waker = asyncio.create_task(_wake_on_stop(t, engine))
    try:
        for i, conn in enumerate(members):
            assert conn.transport is not None
            engine.load(i, conn.seq, conn.off, [due for _, due in conn.out])
            conn.transport.pause_reading()
            conn.out.clear()  # the loop's now: the Python ticker must not time them out
            active[i] = conn
        timeout_ns = int(t.cfg.timeout * 1e9)
        while t.sending and active:
            now = monotonic_ns()
            until = t.measure_ns + ((now - t.measure_ns) // TICK_NS + 1) * TICK_NS
            if deadline is not None:
                until = min(until, deadline)
            ran = loop.run_in_executor(None, engine.run, until, t.measure_ns, timeout_ns)
            try:
                _, backs = await asyncio.shield(ran)
            except asyncio.CancelledError:
                engine.wake()
                await asyncio.wait([ran])
                raise
            _merge(t.hist, engine)
            for i, kind, err in backs:
                _hand_back(engine, i, active.pop(i), kind, err)
            now = monotonic_ns()
            t.sample(now, merged=True)
            if deadline is not None and now >= deadline:
                t.stop_sending()
    finally:
        waker.cancel()
        for i, conn in active.items():
            engine.release(i)
            _restore(engine, i, conn, write=True)
            if conn.transport is not None:
                conn.transport.resume_reading()
        _merge(t.hist, engine)
        engine.close()
        t.held = False
        if not t.sending and t.window_end_ns is None:
            t.close_window(monotonic_ns())


async def _wake_on_stop(t: Tally, engine: Engine) -> None:
    """Told to stop (Ctrl-C, the parent's word): the slice under way ends now."""
    await t.stopped.wait()
    engine.wake()


def _merge(hist: Histogram, engine: Engine) -> None:
    """Add what the loop recorded since the last call to ``hist``."""
    fresh, total_ns, high, low = engine.take()
    if not fresh:
        return
    counts = hist.counts
    for i, n in fresh.items():
        counts[i] += n
    hist.total_ns += total_ns
    hist.max = max(hist.max, high)
    hist.low = min(hist.low, low if low >= 0 else EMPTY_LOW)


def _restore(engine: Engine, i: int, conn: BenchConn, write: bool) -> None:
    """Give connection ``i``'s state back to its BenchConn: messages made, replies owed
    (and how much of the oldest came in), and, with ``write``, the bytes of messages the
    loop made but could not yet write, which the transport now writes."""
    seq, off, dues, unsent, wpos = engine.state(i)
    template = conn.template
    conn.seq = seq
    conn.off = off
    owed = range(seq - len(dues), seq)
    conn.out.extend((template % s, due) for s, due in zip(owed, dues, strict=True))
    if write and unsent < seq and conn.transport is not None and not conn.lost:
        rest = [(template % unsent)[wpos:], *(template % s for s in range(unsent + 1, seq))]
        conn.write(b"".join(rest))


def _hand_back(engine: Engine, i: int, conn: BenchConn, kind: int, err: int) -> None:
    """A connection the loop let go: count it as the Python path would."""
    assert _compiled is not None
    _restore(engine, i, conn, write=False)  # it is failing or at its end: no more sends
    if kind == _compiled.MISMATCH:
        conn.fail("mismatch")
    elif kind == _compiled.TIMEOUT:
        conn.fail("timeout")
    elif kind == _compiled.ERROR:
        conn.fail_lost(OSError(err, os.strerror(err)))
    elif conn.transport is not None:  # end of file: the transport reads it again
        conn.transport.resume_reading()
