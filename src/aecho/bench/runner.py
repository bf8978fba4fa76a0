"""Running a measurement: one worker in this process, or W spawned worker processes whose
results and live progress are merged; and ``main``, what ``aecho bench`` calls."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from time import monotonic_ns
from typing import Any

from aecho.bench.errors import BenchError
from aecho.bench.results import Result, Setup, WorkerResult
from aecho.bench.spawned import run_spawned
from aecho.bench.stopping import (
    STOP_SIGNALS,
    Interrupts,
    WaitFn,
    add_stop_signals,
    ignore,
    interrupt,
    restore,
    say_waiting,
)
from aecho.bench.worker import ProgressFn, Worker, WorkerPlan
from aecho.config import BenchConfig
from aecho.tls import client_context


def main(cfg: BenchConfig) -> int:
    """Run the bench (or the search for the highest rate) and report; return the exit
    status (0 ok, 1 failed).  With ``--json``, a failure still prints a JSON object.

    Raises:
        BenchError: nothing could be measured (one-line reason).
        aecho.config.ConfigError: the options cannot be honoured.
        aecho.offload.handlers.HandlerError: --handler cannot be loaded.
    """
    import aecho.bench.plot as plot
    import aecho.bench.report as report

    if cfg.plot:
        plot.check_plot(cfg.plot)
    setup = Setup.from_cfg(cfg)  # fails on an unverifiable handler before anything starts
    if cfg.tls:
        client_context(cfg.cafile, cfg.insecure)  # a bad --cafile is a usage error: say so now
    # SIGTERM ends a run like Ctrl-C does, so the embedded server is still stopped; and
    # Ctrl-C works even where it was inherited ignored (a shell's background job).
    Interrupts.taken = False
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        for sig in previous:
            signal.signal(sig, interrupt)
    live = not cfg.json and sys.stderr.isatty() and not cfg.find_max_rate
    progress = report.Progress(cfg) if live else None
    on_progress = progress.update if progress is not None else _announce(cfg)
    on_wait = progress.note if progress is not None else say_waiting
    try:
        try:
            with _target(cfg, setup) as (cfg, setup, pid):
                if cfg.find_max_rate:
                    from aecho.bench.search import add_handle, find_max_rate

                    search = find_max_rate(cfg, setup, measure_step, report.print_step)
                    if cfg.plot:
                        add_handle(search, cfg, measure_step, report.print_step)
                    search.server_pid = pid
                else:
                    result = run(cfg, on_progress, setup, on_wait=on_wait)
                    result.server_pid = pid
                # From here on (the embedded server stopping too) the report must come out
                # whole, however often Ctrl-C is pressed.
                ignore(STOP_SIGNALS)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM before the measurement could take it (the embedded server
            # still starting, say): a failure like any other, reported as one.
            Interrupts.taken = True
            raise BenchError("interrupted before anything was measured") from None
        if progress is not None:
            progress.stop()
            progress = None
        if cfg.find_max_rate:
            return report.show_search(search, cfg)
        return report.show(result, cfg)
    except BenchError as exc:
        ignore(STOP_SIGNALS)
        if cfg.json and cfg.find_max_rate:
            report.print_search_failure_json(setup, cfg, exc)
        elif cfg.json:
            report.print_failure_json(setup, exc)
        raise
    finally:
        if progress is not None:
            progress.stop()
        # Once interrupted, bench is on its way out: the signals stay ignored, as one more
        # would cut it short with a traceback.
        if not Interrupts.taken:
            with contextlib.suppress(ValueError):  # not the main thread: nothing was changed
                restore(previous)


def measure_step(cfg: BenchConfig, setup: Setup, drain_s: float, goal_ns: int) -> Result:
    """One --find-max-rate step (see :data:`aecho.bench.search.Measure`).

    Raises:
        BenchError: not one connection could be opened.
    """
    return run(cfg, None, setup, drain_s=drain_s, goal_ns=goal_ns, on_wait=say_waiting)


@contextlib.contextmanager
def _target(cfg: BenchConfig, setup: Setup) -> Iterator[tuple[BenchConfig, Setup, int | None]]:
    """The server to measure: the one named, or an embedded one started for the run.

    Raises:
        BenchError: the embedded server did not start.
    """
    if not cfg.embedded:
        yield cfg, setup, None
        return
    from aecho.bench.embedded import embedded_server

    with embedded_server(cfg) as (host, port, pid):
        served = replace(cfg, host=host, port=port)
        yield served, replace(setup, target=served.target), pid


def _announce(cfg: BenchConfig) -> ProgressFn:
    """Without a terminal, one line on stderr once the connections are up and load starts."""
    said = False

    def on_progress(_: dict[str, Any]) -> None:
        nonlocal said
        if not said:
            said = True
            what = f"{cfg.duration:g} s" if cfg.duration is not None else f"{cfg.messages} messages"
            print(
                f"aecho bench: measuring with {cfg.connections} connections for {what}",
                file=sys.stderr,
                flush=True,
            )

    return on_progress


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plans(
    cfg: BenchConfig, drain_s: float | None = None, goal_ns: int | None = None
) -> list[WorkerPlan]:
    """Each worker's share of the connections, messages and rate."""
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
                drain_s=cfg.timeout if drain_s is None else drain_s,
                goal_ns=goal_ns,
            )
        )
        first += c
    return out


def run(
    cfg: BenchConfig,
    on_progress: ProgressFn | None = None,
    setup: Setup | None = None,
    *,
    drain_s: float | None = None,
    goal_ns: int | None = None,
    on_wait: WaitFn | None = None,
) -> Result:
    """Run the whole measurement: in this process for one worker, spawned processes for more.

    ``drain_s`` bounds the wait for replies owed when the window closes (default
    ``--timeout``); with ``goal_ns`` (a search step) the run stops as soon as it can no
    longer hold p99 within it.  Ctrl-C or SIGTERM (in the main thread) stops it early;
    ``on_wait`` is told when it then waits for replies owed, which one more cuts short.

    Raises:
        BenchError: nothing could be measured (with the one-line reason; ``partial`` holds
            the Result of what was counted, errors included).
        ConfigError: the options cannot be honoured (e.g. an unverifiable handler).
    """
    setup = setup or Setup.from_cfg(cfg)  # fails on an unverifiable handler: before connecting
    worker_plans = plans(cfg, drain_s, goal_ns)
    try:
        if cfg.workers == 1:
            parts, interrupted = _run_inline(cfg, worker_plans[0], on_progress, on_wait)
        else:
            parts, interrupted = run_spawned(cfg, worker_plans, on_progress, on_wait)
    except BenchError as exc:
        if isinstance(exc.partial, WorkerResult):
            exc.partial = Result.merge(setup, [exc.partial])
            exc.partial.failure = str(exc)
        raise
    return Result.merge(setup, parts, interrupted)


def _run_inline(
    cfg: BenchConfig, plan: WorkerPlan, on_progress: ProgressFn | None, on_wait: WaitFn | None
) -> tuple[list[WorkerResult], bool]:
    from aecho.loops import run as run_loop

    interrupted = False

    async def main() -> WorkerResult:
        nonlocal interrupted
        worker = Worker(cfg, plan, on_progress)
        worker.on_wait = on_wait
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = Interrupts.taken = True
            worker.interrupt()  # again: the wait for replies owed is cut short

        installed = add_stop_signals(loop, on_sigint)  # Ctrl-C while connecting too
        try:
            await worker.connect()
            await worker.run(time.monotonic_ns())
        finally:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous)  # remove_signal_handler would leave SIG_DFL
        return worker.result()

    part = run_loop(main(), cfg.loop)
    return [part], interrupted


async def measure(cfg: BenchConfig, on_progress: ProgressFn | None = None) -> Result:
    """One worker with all the connections, on the running loop (no Ctrl-C handling).

    Raises:
        BenchError: not one connection could be opened.
        ConfigError: the handler's replies cannot be verified with this framing.
    """
    worker = Worker(cfg, plans(replace(cfg, workers=1))[0], on_progress)
    await worker.connect()
    await worker.run(monotonic_ns())
    return Result.merge(Setup.from_cfg(cfg), [worker.result()])
