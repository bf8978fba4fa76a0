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
from collections.abc import Callable
from dataclasses import replace
from time import monotonic_ns
from typing import Any

from aecho.bench import BenchError
from aecho.bench.connection import reply_function
from aecho.bench.results import Result, WorkerResult
from aecho.bench.worker import ProgressFn, Worker, WorkerPlan
from aecho.config import BenchConfig, ConfigError


def main(cfg: BenchConfig) -> int:
    """Run the bench and report; return the exit status (0 ok, 1 failed).

    Raises:
        BenchError: nothing could be measured (one-line reason).
        aecho.config.ConfigError: the options cannot be honoured.
        aecho.handlers.HandlerError: --handler cannot be loaded.
    """
    from aecho.bench import plot, report
    from aecho.bench.embedded import embedded_server

    if cfg.plot:
        plot.check_plot()
    reply_function(cfg)
    # SIGTERM ends a run like Ctrl-C does, so the embedded server is still stopped.
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.signal(signal.SIGTERM, _interrupt)
    progress = report.Progress(cfg) if not cfg.json and sys.stderr.isatty() else None
    on_progress = progress.update if progress is not None else _announce(cfg)
    try:
        if cfg.embedded:
            with embedded_server(cfg) as (host, port, pid):
                result = run(replace(cfg, host=host, port=port), on_progress)
            result.server_pid = pid
        else:
            result = run(cfg, on_progress)
    finally:
        if progress is not None:
            progress.stop()
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)
    if cfg.json:
        report.print_json(result)
    else:
        report.print_table(result)
    if cfg.plot:
        plot.write_plot(result, cfg.plot)
    failures = report.verdict(result)
    for line in failures:
        print(f"aecho bench: {line}", file=sys.stderr)
    return 1 if failures else 0


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
            worker.close_all()
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
