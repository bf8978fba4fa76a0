"""``--workers W``: W spawned worker processes, told when to start and stop over a pipe each,
whose results and live progress the parent merges."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import time
from typing import Any

from aecho.bench.errors import BenchError
from aecho.bench.results import WorkerResult
from aecho.bench.stopping import STOP_SIGNALS, Counter, Interrupts, WaitFn, ignore, restore
from aecho.bench.worker import ProgressFn, Worker, WorkerPlan
from aecho.config import BenchConfig, ConfigError

Pipe = multiprocessing.connection.Connection


def worker_main(conn: Pipe, cfg: BenchConfig, plan: WorkerPlan) -> None:
    """Entry point of a spawned worker: connect, report, wait for "go", measure, report.

    Each "stop" from the parent is one Ctrl-C: the first stops sending, the next cuts short
    the wait for the replies still owed (see :meth:`Worker.interrupt`).
    """
    from aecho.loops import run as run_loop

    # Ctrl-C reaches the whole process group; the parent decides and tells us to stop
    # (and if the parent dies, the pipe's EOF stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # so it started (see run_spawned)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def main() -> None:
        def progress(p: dict[str, Any]) -> None:
            conn.send(("progress", plan.index, p))

        worker = Worker(cfg, plan, progress)
        worker.on_wait = lambda drain_s: conn.send(("waiting", plan.index, drain_s))
        loop = asyncio.get_running_loop()
        go: asyncio.Future[tuple[int, int]] = loop.create_future()

        def readable() -> None:
            try:
                msg = conn.recv()
            except EOFError:  # the parent is gone: stop, and wait for no reply
                loop.remove_reader(conn.fileno())
                msg = ("stop",)
                worker.interrupt()
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


def run_spawned(
    cfg: BenchConfig,
    worker_plans: list[WorkerPlan],
    on_progress: ProgressFn | None,
    on_wait: WaitFn | None = None,
) -> tuple[list[WorkerResult], bool]:
    """The workers' results (those that could not connect last), and whether they were
    interrupted.

    Raises:
        BenchError: no worker could connect, or none reported a result.
    """
    # Spawn, not fork: the parent may hold threads, and nothing forks a process
    # that could be running an event loop.
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Pipe] = []
    procs: list[Any] = []
    # A worker starts with SIGINT and SIGTERM ignored (an ignored signal stays ignored
    # across exec): Ctrl-C reaches the whole process group, and one that came while a
    # worker was still importing would kill it with a traceback.  The parent ignores
    # them for the milliseconds it takes to start the workers: a Ctrl-C then is lost.
    handlers = ignore(STOP_SIGNALS)
    try:
        for plan in worker_plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, cfg, plan), daemon=True)
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        with Counter() as signals:
            return _drive(cfg, pipes, signals, on_progress, on_wait)
    finally:
        # Signals ignored again: a Ctrl-C must not cut the clean-up short.
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
        restore(handlers)


def _drive(
    cfg: BenchConfig,
    pipes: list[Pipe],
    signals: Counter,
    on_progress: ProgressFn | None,
    on_wait: WaitFn | None,
) -> tuple[list[WorkerResult], bool]:
    """Wait for every worker to connect, start them together, merge their progress and
    collect their results; each Ctrl-C or SIGTERM is one "stop" to each worker still at work.

    Raises:
        BenchError: no worker could connect, or none reported a result.
    """
    results: dict[int, WorkerResult] = {}
    progress: dict[int, dict[str, Any]] = {}
    lost: list[WorkerResult] = []  # what workers that could not connect counted
    stops = 0

    def stop(workers: set[int]) -> None:
        nonlocal stops
        fresh = signals.new()
        if fresh:
            Interrupts.taken = True
            stops += fresh
            for i in workers:
                for _ in range(fresh):
                    with contextlib.suppress(OSError):
                        pipes[i].send(("stop",))

    connected = 0
    fatal: str | None = None
    waiting = set(range(len(pipes)))
    patience = 60 + cfg.timeout  # for the next worker to be done connecting
    deadline = time.monotonic() + patience
    while waiting and not stops:  # Ctrl-C while connecting: each worker stops and reports
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("workers did not finish connecting in time")
        watched: list[Any] = [pipes[i] for i in waiting]
        for p in multiprocessing.connection.wait([*watched, signals.wakeup], left):
            if p is signals.wakeup:
                continue
            deadline = time.monotonic() + patience
            i = pipes.index(p)  # type: ignore[arg-type]
            waiting.discard(i)
            try:
                msg = pipes[i].recv()
            except (EOFError, OSError):
                fatal = fatal or f"worker {i} exited while connecting"
                continue
            if msg[0] == "fatal":
                fatal = fatal or msg[2]
                if msg[3] is not None:
                    lost.append(msg[3])
            else:
                connected += msg[2]
        stop(set(range(len(pipes))))
    if not stops:
        if fatal is not None and not connected:
            raise BenchError(fatal, partial=_sum_parts(lost))
        start = time.monotonic_ns() + 50_000_000
        start_unix = time.time_ns() + start - time.monotonic_ns()
        for p in pipes:
            with contextlib.suppress(OSError):
                p.send(("go", start, start_unix))
    pending = set(range(len(pipes)))
    said = False
    while pending:
        watched = [pipes[i] for i in pending]
        for p in multiprocessing.connection.wait([*watched, signals.wakeup]):
            if p is signals.wakeup:
                continue
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
            elif msg[0] == "waiting":
                if on_wait is not None and not said:
                    on_wait(msg[2])
                said = True
            elif msg[0] in ("result", "fatal"):
                if msg[0] == "result":
                    results[i] = msg[2]
                elif msg[3] is not None:  # it could not connect: what it counted
                    lost.append(msg[3])
                pending.discard(i)
        stop(pending)  # workers ignore SIGINT: they stop sending, or waiting, when told
    if not results:
        raise BenchError("no worker reported a result")
    return [results[i] for i in sorted(results)] + lost, stops > 0


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
