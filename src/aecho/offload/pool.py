"""The worker pool: slots, batched dispatch, recovery from crashes, timeouts.

Knows nothing of client sockets.  A connection submits messages with a callback; the
pool gathers every connection's messages once per loop iteration, ships them to worker
processes in batches (sizes from :mod:`aecho.offload.batching`) and reports one
outcome per message: the reply bytes, or the exception that stands in for it.

Each worker talks to the pool over a socket of its own that the event loop watches
(:mod:`aecho.offload.link`), so a crash or a timeout touches only that worker's
tasks and no thread stands between the loop and a worker; the workers come from
multiprocessing's forkserver, never from a fork of the process running the event
loop.  docs/architecture.md says why.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
from collections import deque
from typing import Any

from aecho.offload import batching, wire
from aecho.offload.handlers import HandlerError
from aecho.offload.link import Worker, stop
from aecho.offload.outcomes import (
    Callback,
    Outcome,
    PoolClosed,
    PoolError,
    WorkerDied,
    failure,
)
from aecho.offload.slots import Counters, Slot, Task
from aecho.offload.turns import Turns, blame, suspects_of
from aecho.offload.watch import Watch
from aecho.text import plural

log = logging.getLogger("aecho.offload")


# -- the pool --------------------------------------------------------------------------------


class Pool:
    """Runs a handler in worker processes, in batches."""

    START_TIMEOUT_S = 60.0
    STOP_JOIN_S = 5.0

    def __init__(
        self,
        handler_name: str,
        size: int,
        timeout: float,
        stats: Counters,
        directory: str | None = None,
    ) -> None:
        self.handler_name = handler_name
        # Workers import the handler from here first (None: the server's working directory).
        self.directory = directory or os.getcwd()
        self.size = size
        self.timeout = timeout
        self.stats = stats
        self._ctx = multiprocessing.get_context("forkserver")
        self._slots: list[Slot] = []
        # The queue: messages flat, and callback, token, count per submission, flat.
        self._messages: list[bytes] = []
        self._entries: list[Any] = []
        self._since = 0.0  # when the oldest queued message was queued
        # Submissions a flush left queued, by connection, each taking its turn.
        self._turns = Turns()
        # Submissions of a batch that killed its worker, to be run again one at a time.
        self._suspects: deque[Task] = deque()
        self._flush_pending = False
        self._closing = False
        self._cost = 0.0  # moving average of worker seconds per message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch: Watch | None = None  # when running tasks are due back, or late
        self._drained: asyncio.Event | None = None  # set once no task is left, while closing

    @property
    def pids(self) -> list[int]:
        """Worker pids of the current workers (for logs and tests)."""
        return [s.worker.pid for s in self._slots if s.worker is not None and s.worker.pid]

    @property
    def running(self) -> int:
        """Tasks shipped to workers and not back yet."""
        return sum(len(slot.tasks) for slot in self._slots)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and wait until each has resolved the handler.

        Raises:
            HandlerError: the handler cannot be loaded in a worker.
            PoolError: the worker processes could not be started.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._ctx.set_forkserver_preload(["aecho.offload.handlers", "aecho.offload.worker"])
        self._slots = [Slot(i) for i in range(self.size)]
        self._watch = Watch(loop, self._slots, self._flush, self._take_back)
        try:
            hellos = []
            for slot in self._slots:
                fresh = self._spawn(slot)
                fresh.hello = loop.create_future()
                hellos.append(fresh.hello)
            await asyncio.wait_for(asyncio.gather(*hellos), self.START_TIMEOUT_S)
        except BaseException as exc:
            await self._stop_workers(kill=True)
            if isinstance(exc, HandlerError):
                raise
            if isinstance(exc, OSError | EOFError | TimeoutError):
                raise PoolError(
                    f"cannot start worker processes: {str(exc) or 'timed out'}"
                ) from exc
            raise
        for slot in self._slots:
            assert slot.worker is not None
            slot.worker.hello = None
        # Workers are not daemonic (a handler may start processes of its own), so
        # multiprocessing joins them at exit: a pool never closed must not hang it.
        atexit.register(self._kill_all)
        log.info(
            "offload: %s (forkserver), handler %s, timeout %gs",
            plural(self.size, "worker process", "worker processes"),
            self.handler_name,
            self.timeout,
        )
        self._watchdog = loop.call_later(self._tick_interval, self._tick)

    def _spawn(self, slot: Slot) -> Worker:
        """Start a worker for ``slot``.

        Raises:
            OSError: the socket or the process could not be made.
            EOFError: the forkserver went away while starting the process.
        """
        assert self._loop is not None
        fresh = Worker(
            self._ctx,
            self._loop,
            # Tracebacks of handler errors cost a formatting each: only when they are shown.
            (os.getpid(), self.directory, log.isEnabledFor(logging.DEBUG), self.handler_name),
            functools.partial(self._result, slot),
            functools.partial(self._lost, slot),
        )
        slot.worker = fresh
        return fresh

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for running batches, then stop every worker.

        Queued messages not yet shipped, and batches still running at the
        deadline, resolve with :class:`PoolClosed`.
        """
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self._kill_all)
        for timer in (self._watchdog, self._watch):
            if timer is not None:
                timer.cancel()
        closed = PoolClosed("the server is stopping")
        self._resolve_all(self._take_all(), closed)
        self._give_up_suspects(closed)
        if timeout > 0 and any(s.tasks for s in self._slots):
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        busy = False
        for slot in self._slots:
            busy = busy or bool(slot.tasks)
            while slot.tasks:
                self._resolve_all(slot.tasks.popleft(), closed)
        await self._stop_workers(kill=busy)

    async def _stop_workers(self, kill: bool) -> None:
        workers = [s.worker for s in self._slots if s.worker is not None]
        for slot in self._slots:
            slot.worker = None
        if not await stop(workers, kill, self.STOP_JOIN_S):
            log.warning("worker processes did not exit in %gs; killed them", self.STOP_JOIN_S)

    def _kill_all(self) -> None:
        for slot in self._slots:
            if slot.worker is not None:
                slot.worker.close()
                slot.worker.kill()

    # -- dispatch ----------------------------------------------------------------------------

    def submit_to(self, messages: list[bytes], callback: Callback, token: Any) -> None:
        """Queue ``messages``; later call ``callback(token, outcomes, start, stop)`` on the loop.

        ``outcomes[start:stop]`` are this submission's outcomes, one per message
        and in order: the reply bytes, or the exception that stands in for it.
        """
        if not self._flush_pending and not self._schedule_flush(callback, token, len(messages)):
            return
        self._messages += messages
        self._entries += (callback, token, len(messages))

    def submit_one(self, message: bytes, callback: Callback, token: Any) -> None:
        """:meth:`submit_to` for one message: the raw hot path, no list kept."""
        if not self._flush_pending and not self._schedule_flush(callback, token, 1):
            return
        self._messages.append(message)
        self._entries += (callback, token, 1)

    def _schedule_flush(self, callback: Callback, token: Any, count: int) -> bool:
        """Schedule the flush for this loop iteration; False if the pool is closing.

        One flush per loop iteration gathers every connection's messages.  A
        submission refused because the pool is closing is told so soon, by the loop.
        """
        loop = self._loop
        assert loop is not None, "pool not started"
        if self._closing:
            closed: list[Outcome] = [PoolClosed("the server is stopping")] * count
            loop.call_soon(Task([callback, token, count], [], 0.0).deliver, closed)
            return False
        if not self._messages:
            self._since = loop.time()
        self._flush_pending = True
        loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_pending = False
        queued = len(self._messages) + self._turns.messages
        if not queued and not self._suspects:
            return
        if self._closing:
            closed = PoolClosed("the server is stopping")
            self._resolve_all(self._take_all(), closed)
            self._give_up_suspects(closed)
            return
        # Free task positions, idle workers first, then those with one task running.
        positions = [
            slot
            for depth in range(batching.TASKS_PER_WORKER)
            for slot in self._slots
            if len(slot.tasks) <= depth and slot.worker is not None and not slot.late
        ]
        if self._suspects:
            # Each in a task of its own: if it kills its worker again, it fails alone.
            taken = min(len(positions), len(self._suspects))
            for slot in positions[:taken]:
                self._dispatch(slot, self._suspects.popleft())
            del positions[:taken]
        if not positions or not queued:
            return
        smallest = batching.min_batch(self._cost)
        assert self._watch is not None
        if queued < smallest and self._watch.wait_for_a_return(positions[0]):
            return
        n_tasks = batching.task_count(queued, len(positions), smallest)
        most = batching.max_task(self._cost)
        taking = bool(self._turns.messages)
        if batching.take_turns(queued, n_tasks * most, self._cost, taking):
            # Connections take turns: one flooding the pool keeps no other one waiting.
            self._turns.add(self._take(len(self._entries), len(self._messages)))
            for slot in positions[:n_tasks]:
                self._dispatch(slot, self._turns.take(most))
                if not self._turns.messages:
                    break
            return
        if taking:  # too little work queued to be worth turns: first come, first served
            flat = self._turns.take_all(self._take(len(self._entries), len(self._messages)))
            self._entries, self._messages = flat.entries, flat.messages
        for i in range(n_tasks):
            queued = len(self._messages)
            if i == n_tasks - 1 and queued <= most:
                # The rest of the queue; under load, usually the whole of it.
                task = self._take(len(self._entries), queued)
            else:
                target = min(most, batching.task_size(queued, n_tasks - i))
                entries = self._entries
                n_entries = n_messages = 0
                while n_entries < len(entries) and n_messages < target:
                    n_messages += entries[n_entries + 2]
                    n_entries += 3
                task = self._take(n_entries, n_messages)
            self._dispatch(positions[i], task)
            if not self._messages:
                break

    def _take(self, n_entries: int, n_messages: int) -> Task:
        """The queue's first ``n_entries`` entries (of ``n_messages`` messages), as a task."""
        if n_entries == len(self._entries):
            task = Task(self._entries, self._messages, self._since)
            self._entries = []
            self._messages = []
        else:
            task = Task(self._entries[:n_entries], self._messages[:n_messages], self._since)
            del self._entries[:n_entries]
            del self._messages[:n_messages]
        return task

    def _take_all(self) -> Task:
        """Everything queued, as one task: to fail it (closing, or no worker to run it)."""
        return self._turns.take_all(self._take(len(self._entries), len(self._messages)))

    def _dispatch(self, slot: Slot, task: Task) -> None:
        fresh = slot.worker
        assert fresh is not None and self._loop is not None and self._watch is not None
        slot.tasks.append(task)
        if len(slot.tasks) == 1:
            self._watch.started(slot, self._loop.time(), self._cost)
        fresh.send(task.messages)

    def _result(
        self,
        slot: Slot,
        source: Worker,
        data: bytes,
        offset: int,
        count: int,
        blob: int,
        extra: int,
        seconds: float,
    ) -> None:
        """A result from ``slot``'s worker (see :mod:`aecho.offload.wire`).

        Its header was checked against the batch it answers, the slot's first task.

        Raises:
            wire.Malformed: the lengths or the failures do not hold.
        """
        replies, failed = wire.parse(data, offset, count, blob, extra)
        tasks = slot.tasks
        task = tasks.popleft()
        assert self._loop is not None and self._watch is not None
        now = self._loop.time()
        slot.late = 0
        if count:
            cost = seconds / count  # a moving average, from the first measurement on
            self._cost = 0.8 * self._cost + 0.2 * cost if self._cost else cost
        if tasks:
            self._watch.started(slot, now, self._cost)
        self._resolve(task, replies, failed, now)
        if not tasks:
            self._take_back()  # to this worker, idle now
        if self._messages or self._turns.messages or self._suspects:
            self._flush()
        self._check_drained()

    def _take_back(self) -> None:
        """Queue what late workers give back (see :mod:`aecho.offload.watch`) and flush."""
        assert self._watch is not None
        back = self._watch.take_back()
        for task in reversed(back):
            self._requeue(task)
        if back:
            self._flush()

    def _requeue(self, task: Task) -> None:
        """A task sent out and taken back, to run again: alone if it ran alone, ahead of
        what its connections have waiting otherwise."""
        if task.alone:
            self._suspects.appendleft(task)
        else:
            self._turns.put_back(task)

    def _check_drained(self) -> None:
        if self._drained is not None and not any(s.tasks for s in self._slots):
            self._drained.set()

    def _resolve(
        self, task: Task, replies: list[bytes], failures: wire.Failures | None, now: float
    ) -> None:
        stats = self.stats
        stats.messages += len(replies) - task.dropped
        task.waited(now, stats.offload_latency)
        outcomes: list[Outcome] = replies  # type: ignore[assignment]
        if failures:
            for index, (name, text, trace) in failures.items():
                outcomes[index] = failure(name, text, trace)
        task.deliver(outcomes)

    def _resolve_all(self, task: Task, exc: BaseException) -> None:
        self.stats.messages += len(task.messages) - task.dropped
        task.deliver([exc] * len(task.messages))

    def _give_up_suspects(self, exc: BaseException) -> None:
        while self._suspects:
            self._resolve_all(self._suspects.popleft(), exc)

    # -- faults ------------------------------------------------------------------------------

    def _lost(self, slot: Slot, source: Worker, why: str) -> None:
        """``slot``'s worker closed its socket, broke it, or broke the protocol."""
        exc = None
        if slot.tasks:
            said = why if why.startswith("sent") else "died while handling this message"
            exc = WorkerDied(f"worker process {said}")
        self._evict(slot, exc, why)
        self._take_back()
        self._flush()
        self._check_drained()

    def _evict(self, slot: Slot, exc: BaseException | None, why: str = "") -> None:
        """Replace the slot's worker.  The tasks queued behind its running task go
        back, each connection's ahead of what it has waiting.

        The running task fails with ``exc``, unless its worker died under several
        submissions, or hung under several connections' (:func:`suspects_of`): then each
        runs again in a task of its own, so that only the guilty one fails (the others'
        messages may be handled twice: at least once, never lost).  One whose worker was
        on a message it had given back runs again whole (:func:`blame`).
        """
        old, slot.worker, slot.late = slot.worker, None, 0
        culprit, innocent = blame(slot.tasks, exc, old)  # (its progress read before release)
        pid = old.pid if old is not None else None
        if old is not None:
            old.close()
            old.kill()
            old.release()
        self.stats.pool_restarts += 1
        if culprit is None:  # nothing running, or a message given back: blamed where it runs
            said = "between tasks" if exc is None else "on a message it had given back"
            log.warning("worker %s %s %s; replacing it", pid, why or exc or "died", said)
        # A batch that hung is split by connection only: each submission alone would
        # wait out the timeout in turn, with everything queued behind them.
        elif not self._closing and len(suspects := suspects_of(culprit, exc)) > 1:
            log.warning(
                "worker %s: %s; replacing the worker and running its batch again in %d parts,"
                " one at a time",
                pid,
                why or exc,
                len(suspects),
            )
            self._suspects.extendleft(reversed(suspects))
        else:
            assert exc is not None
            log.warning(
                "worker %s: %s; %s failed, replacing the worker",
                pid,
                why or exc,
                plural(len(culprit.messages), "message"),
            )
            self._resolve_all(culprit, exc)
        if not self._closing and old is not None and old.ready:
            # One that died before it was ready is restarted by the tick instead: a
            # worker that cannot start must not be restarted in a tight loop.
            self._restart(slot)
        for task in reversed(innocent):
            if self._closing:
                self._resolve_all(task, PoolClosed("the server is stopping"))
            else:
                self._requeue(task)

    def _restart(self, slot: Slot) -> bool:
        """Start a worker for an empty slot; False (logged) if it cannot be started now."""
        try:
            self._spawn(slot)
        except (OSError, EOFError) as exc:
            log.error("cannot start a worker process (will retry): %s", exc)
            return False
        return True

    @property
    def _tick_interval(self) -> float:
        return max(0.05, min(1.0, self.timeout / 10))

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        flush = False
        for slot in self._slots:
            late = slot.overdue(now, self.timeout, self.START_TIMEOUT_S)
            if late is not None:
                self._evict(slot, late)
                flush = True
            elif slot.worker is None:
                flush = self._restart(slot) or flush
        if not any(slot.worker is not None for slot in self._slots):
            # Nothing can run them: say so rather than leave the peers waiting.
            died = WorkerDied("cannot start a worker process")
            if self._messages or self._turns.messages:
                self._resolve_all(self._take_all(), died)
            self._give_up_suspects(died)
        if flush:
            self._take_back()
            self._flush()
        if not self._closing:
            self._watchdog = loop.call_later(self._tick_interval, self._tick)
