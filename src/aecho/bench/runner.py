"""Running a measurement: one worker in this process, or W spawned worker processes whose
results and live progress are merged; and ``main``, what ``aecho bench`` calls."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from time import monotonic_ns
from typing import Any

from aecho.bench.errors import BenchError
from aecho.bench.results import Result, Setup, WorkerResult
from aecho.bench.worker import ProgressFn, Worker, WorkerPlan
from aecho.config import BenchConfig, ConfigError
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
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        for sig in previous:
            signal.signal(sig, _interrupt)
    live = not cfg.json and sys.stderr.isatty() and not cfg.find_max_rate
    progress = report.Progress(cfg) if live else None
    on_progress = progress.update if progress is not None else _announce(cfg)
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
                    result = run(cfg, on_progress, setup)
                    result.server_pid = pid
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM before the measurement could take it (the embedded server
            # still starting, say): a failure like any other, reported as one.
            raise BenchError("interrupted before anything was measured") from None
        # From here on the report must come out whole, however often Ctrl-C is pressed.
        _ignore(set(previous))
        if progress is not None:
            progress.stop()
            progress = None
        if cfg.find_max_rate:
            return report.show_search(search, cfg)
        return report.show(result, cfg)
    except BenchError as exc:
        _ignore(set(previous))
        if cfg.json and cfg.find_max_rate:
            report.print_search_failure_json(setup, cfg, exc)
        elif cfg.json:
            report.print_failure_json(setup, exc)
        raise
    finally:
        if progress is not None:
            progress.stop()
        with contextlib.suppress(ValueError):  # not the main thread: nothing was changed
            _restore(previous)


def measure_step(cfg: BenchConfig, setup: Setup, drain_s: float, goal_ns: int) -> Result:
    """One --find-max-rate step (see :data:`aecho.bench.search.Measure`).

    Raises:
        BenchError: not one connection could be opened.
    """
    return run(cfg, None, setup, drain_s=drain_s, goal_ns=goal_ns)


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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
) -> Result:
    """Run the whole measurement: in this process for one worker, spawned processes for more.

    ``drain_s`` bounds the wait for replies owed when the window closes (default
    ``--timeout``); with ``goal_ns`` (a search step) the run stops as soon as it can no
    longer hold p99 within it.

    Raises:
        BenchError: nothing could be measured (with the one-line reason; ``partial`` holds
            the Result of what was counted, errors included).
        ConfigError: the options cannot be honoured (e.g. an unverifiable handler).
    """
    setup = setup or Setup.from_cfg(cfg)  # fails on an unverifiable handler: before connecting
    worker_plans = plans(cfg, drain_s, goal_ns)
    try:
        if cfg.workers == 1:
            parts, interrupted = _run_inline(cfg, worker_plans[0], on_progress)
        else:
            parts, interrupted = _run_spawned(cfg, worker_plans, on_progress)
    except BenchError as exc:
        if isinstance(exc.partial, WorkerResult):
            exc.partial = Result.merge(setup, [exc.partial])
            exc.partial.failure = str(exc)
        raise
    return Result.merge(setup, parts, interrupted)


def _run_inline(
    cfg: BenchConfig, plan: WorkerPlan, on_progress: ProgressFn | None
) -> tuple[list[WorkerResult], bool]:
    from aecho.loops import run as run_loop

    interrupted = False

    async def main() -> WorkerResult:
        nonlocal interrupted
        worker = Worker(cfg, plan, on_progress)
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            worker.interrupt()

        installed = _add_stop_signals(loop, on_sigint)  # Ctrl-C while connecting too
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # so it started (see _run_spawned)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def main() -> None:
        def progress(p: dict[str, Any]) -> None:
            conn.send(("progress", plan.index, p))

        worker = Worker(cfg, plan, progress)
        loop = asyncio.get_running_loop()
        go: asyncio.Future[tuple[int, int]] = loop.create_future()

        def readable() -> None:
            try:
                msg = conn.recv()
            except EOFError:
                msg = ("stop",)
            if msg[0] == "go" and not go.done():
                go.set_result((msg[1], msg[2]))
            elif msg[0] == "stop":
                if not go.done():
                    go.set_result((-1, 0))
                worker.interrupt()

        loop.add_reader(conn.fileno(), readable)  # "stop" may come while connecting
        try:
            await worker.connect()
        except (BenchError, ConfigError) as exc:
            loop.remove_reader(conn.fileno())
            partial = exc.partial if isinstance(exc, BenchError) else None
            conn.send(("fatal", plan.index, str(exc), partial))
            return
        conn.send(("connected", plan.index, len(worker.conns)))
        start, start_unix = await go
        if start >= 0:
            await worker.run(start, start_unix)
        else:
            worker.close_all()
        loop.remove_reader(conn.fileno())
        conn.send(("result", plan.index, worker.result()))

    try:
        run_loop(main(), cfg.loop)
    finally:
        conn.close()


def _run_spawned(
    cfg: BenchConfig, worker_plans: list[WorkerPlan], on_progress: ProgressFn | None
) -> tuple[list[WorkerResult], bool]:
    """Raises: BenchError: no worker could connect, or none reported a result."""
    # Spawn, not fork: the parent may hold threads, and nothing forks a process
    # that could be running an event loop.
    ctx = multiprocessing.get_context("spawn")
    pipes: list[multiprocessing.connection.Connection] = []
    procs = []
    # A worker starts with SIGINT and SIGTERM ignored (an ignored signal stays ignored
    # across exec): Ctrl-C reaches the whole process group, and one that came while a
    # worker was still importing would kill it with a traceback.  The parent ignores
    # them for the milliseconds it takes to start the workers: a Ctrl-C then is lost.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    handlers = _ignore(stop_signals)
    try:
        for plan in worker_plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, cfg, plan), daemon=True)
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
    finally:
        _restore(handlers)
    results: dict[int, WorkerResult] = {}
    progress: dict[int, dict[str, Any]] = {}
    interrupted = False
    try:
        connected = 0
        fatal: str | None = None
        lost: list[WorkerResult] = []  # what workers that could not connect counted
        waiting = set(range(len(pipes)))
        try:
            while waiting:
                ready = multiprocessing.connection.wait(
                    [pipes[i] for i in waiting], 60 + cfg.timeout
                )
                if not ready:
                    raise BenchError("workers did not finish connecting in time")
                for p in ready:
                    i = pipes.index(p)  # type: ignore[arg-type]
                    try:
                        msg = pipes[i].recv()
                    except (EOFError, OSError):
                        fatal = fatal or f"worker {i} exited while connecting"
                        waiting.discard(i)
                        continue
                    waiting.discard(i)
                    if msg[0] == "fatal":
                        fatal = fatal or msg[2]
                        if msg[3] is not None:
                            lost.append(msg[3])
                    else:
                        connected += msg[2]
        except KeyboardInterrupt:
            # Ctrl-C while connecting: each worker stops, and reports what it counted.
            interrupted = True
            for p in pipes:
                with contextlib.suppress(OSError):
                    p.send(("stop",))
        if not interrupted:
            if fatal is not None and not connected:
                raise BenchError(fatal, partial=_sum_parts(lost))
            start = time.monotonic_ns() + 50_000_000
            start_unix = time.time_ns() + start - time.monotonic_ns()
            for p in pipes:
                with contextlib.suppress(OSError):
                    p.send(("go", start, start_unix))
        pending = set(range(len(pipes)))
        while pending:
            try:
                for p in multiprocessing.connection.wait([pipes[i] for i in pending], 0.5):
                    i = pipes.index(p)  # type: ignore[arg-type]
                    try:
                        msg = pipes[i].recv()
                    except (EOFError, OSError):
                        pending.discard(i)
                        continue
                    if msg[0] == "progress":
                        progress[i] = msg[2]
                        if on_progress is not None:
                            on_progress(merge_progress(list(progress.values())))
                    elif msg[0] in ("result", "fatal"):
                        if msg[0] == "result":
                            results[i] = msg[2]
                        elif msg[3] is not None:  # it could not connect: what it counted
                            lost.append(msg[3])
                        pending.discard(i)
            except KeyboardInterrupt:
                # Workers ignore SIGINT: they stop sending, drain and report when told.
                interrupted = True
                for i in pending:
                    with contextlib.suppress(OSError):
                        pipes[i].send(("stop",))
    finally:
        # Further Ctrl-Cs must not cut the clean-up short: the report comes next.
        handlers = _ignore(stop_signals)
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
        _restore(handlers)
    if not results:
        raise BenchError("no worker reported a result")
    return [results[i] for i in sorted(results)] + lost, interrupted


def _ignore(signals: set[signal.Signals]) -> dict[signal.Signals, Any]:
    """Ignore ``signals`` (in the main thread only); return what to restore."""
    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: not ours to change
        for sig in signals:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    return previous


def _restore(previous: dict[signal.Signals, Any]) -> None:
    """Put back handlers from :func:`signal.getsignal` or :func:`_ignore`; None (one not
    installed from Python) cannot be put back, and is left as it is now."""
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def _sum_parts(parts: list[WorkerResult]) -> WorkerResult | None:
    """The errors counted by workers that failed to connect, as one part (None: none)."""
    if not parts:
        return None
    first = parts[0]
    for p in parts[1:]:
        for kind, n in p.errors.items():
            first.errors[kind] += n
    return first


def merge_progress(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One live line from each worker's latest figures: counts and rates add up (each
    worker measured its rate over its own interval); p99 is the worst, for the live line
    only (the final one is exact)."""
    rates = [p["rate"] for p in parts if p["rate"] is not None]
    return {
        "elapsed_s": max(p["elapsed_s"] for p in parts),
        "warmup_left_s": max(p["warmup_left_s"] for p in parts),
        "messages": sum(p["messages"] for p in parts),
        "rate": sum(rates) if rates else None,
        "errors": sum(p["errors"] for p in parts),
        "p99_ns": max(p["p99_ns"] for p in parts),
        "warming": any(p["warming"] for p in parts),
    }
