"""Processors: where a handler runs.  Knows nothing of sockets.

``InlineProcessor`` calls the handler on the event loop, synchronously; the
connection uses its ``handler`` directly on the hot path.  A pooled processor
(:class:`PoolProcessor`, served by ``connection.PooledConnection``) takes
batches with :meth:`Processor.submit_to` and reports one outcome per message:
the reply bytes, or the exception that stood in for it.

Process offload (:class:`PoolProcessor`)
----------------------------------------

*Start method: forkserver, throughout.*  The server's process runs an event
loop (uvloop's or asyncio's: epoll fds, a signal wakeup fd, listening and
client sockets, executor threads).  ``fork()`` of that process would copy all
of it into every worker — a worker holding the listening socket keeps the port
open after the server dies, and a child forked while another thread holds a
lock can deadlock.  The forkserver is a fresh interpreter started with
fork+exec (like ``subprocess``); it forks the workers from its own single
thread, so no worker is ever a copy of a process with a running loop, and
rebuilding a worker after a crash is the same operation as starting one.
Pre-forking before the loop would save one start-up path but still needs the
forkserver for rebuilds, so there would be two ways to make a worker instead
of one.  The forkserver preloads ``aecho.handlers``, so a new worker costs a
fork, not an interpreter start-up.

*One single-worker executor per worker ("slot").*  A ``ProcessPoolExecutor``
that loses one process fails every future it holds.  With one executor per
worker, a crash or a timeout touches only that worker's tasks, and since a
single worker runs its tasks in order, the oldest unfinished task is the one
that was running: it fails, the tasks queued behind it are sent again.

*Batching.*  Submitting only queues.  A flush, scheduled once per loop
iteration, cuts the queue into tasks and gives each worker at most
``TASKS_PER_WORKER`` of them (one running, one ready), so the queue grows while
the workers are busy and batches get larger exactly when load is high.  How
many tasks a flush makes depends on the measured cost of a message in the
worker: cheap handlers get few large tasks (per-task IPC is the limit, about
12-13 k tasks/s here), costly ones are spread over every worker.  A queue too
small for a task of its own waits while a task is out and due back (see
:meth:`PoolProcessor._wait_for_a_return`): under load a cheap handler then runs
one large task at a time on one worker, which measured about 8% cheaper for the
event loop than spreading the same messages over every worker.

*Workers* carry the process title ``aecho: worker``, ignore SIGINT (a
terminal's Ctrl-C reaches the whole process group; the server turns it into a
graceful stop and shuts the workers down itself), and never outlive the server:
a thread waits on a pidfd of the server and exits the worker the moment the
server is gone, even after SIGKILL.  The forkserver, not the server, is a
worker's parent, so ``PR_SET_PDEATHSIG`` (checked against ``getppid`` for the
race at start) covers the forkserver dying; the forkserver itself exits once
the server and all workers are gone.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import functools
import logging
import math
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from aecho.handlers import Handler, HandlerError, load_handler
from aecho.stats import Stats

if TYPE_CHECKING:
    from aecho.config import ServerConfig

Outcome = bytes | BaseException
# Told where a submission's outcomes are: callback(token, outcomes, start, stop).  The
# list is shared by every submission of a batch; this one's are outcomes[start:stop].
Callback = Callable[[Any, list[Outcome], int, int], None]

log = logging.getLogger("aecho.offload")

WORKER_TITLE = "aecho: worker"


class Processor:
    """Interface every processor implements."""

    def __init__(self, handler: Handler, handler_name: str = "echo") -> None:
        self.handler = handler
        self.handler_name = handler_name
        # The server hands over its counters (handler errors, pool restarts, latency).
        self.stats = Stats()

    async def start(self) -> None:
        """Acquire resources (worker processes); called once, inside the running loop."""

    def submit_to(self, messages: list[bytes], callback: Callback, token: Any) -> None:
        """Queue ``messages``; later call ``callback(token, outcomes, start, stop)`` on the loop.

        ``outcomes[start:stop]`` are this submission's outcomes, one per message
        and in order: the reply bytes, or the exception that stands in for it.
        """
        raise NotImplementedError

    def submit_one(self, message: bytes, callback: Callback, token: Any) -> None:
        """:meth:`submit_to` for a single message, without a list around it."""
        self.submit_to([message], callback, token)

    async def close(self, timeout: float) -> None:
        """Finish or abandon outstanding work within ``timeout`` seconds and release resources."""


class InlineProcessor(Processor):
    """Runs the handler on the event loop, in the connection's own call."""


# -- failures a pooled message can have ------------------------------------------------------


class HandlerFailed(Exception):
    """A handler raised in a worker.

    Workers send back the exception's class name and text, never the object: an
    exception that pickles but cannot be unpickled would break the executor.  The
    server rebuilds a subclass of this named like the original, so the peer's
    ``ERR ValueError: ...`` line reads the same as with inline processing.
    """


class WorkerDied(Exception):
    """The worker process running this message's batch died."""


class HandlerTimeout(Exception):
    """The batch holding this message ran longer than ``--handler-timeout``."""


class PoolClosed(Exception):
    """The server stopped before this message was processed."""


class PoolError(HandlerError):
    """Worker processes could not be started; str() is the user message."""


_failure_types: dict[str, type[HandlerFailed]] = {}


def _failure(name: str, text: str) -> HandlerFailed:
    cls = _failure_types.get(name)
    if cls is None:
        cls = type(name, (HandlerFailed,), {"__module__": __name__})
        if len(_failure_types) < 1000:
            _failure_types[name] = cls
    return cls(text)


# -- worker side -----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_handlers: dict[str, Handler] = {}

# A batch crosses the process boundary packed: one bytes object holding every
# message back to back, and their lengths as a machine-int array.  Pickling one
# object instead of hundreds keeps the executor's threads, which share the
# server's GIL, off the event loop's back.  Replies come back the same way, with
# failures as {index: (exception name, text)}.
Packed = tuple[bytes, bytes]
Failures = dict[int, tuple[str, str]]


def pack(messages: list[bytes]) -> Packed:
    return b"".join(messages), array.array("I", map(len, messages)).tobytes()


def unpack(packed: Packed) -> list[bytes]:
    blob, lengths = packed
    out: list[bytes] = []
    append = out.append
    offset = 0
    for n in array.array("I", lengths):
        end = offset + n
        append(blob[offset:end])
        offset = end
    return out


def _worker_init(server_pid: int) -> None:
    """First thing in every worker: title, signals, and the watch on the server."""
    from setproctitle import setproctitle

    setproctitle(WORKER_TITLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(0)
    _watch_server(server_pid)


def _watch_server(server_pid: int) -> None:
    """Exit this worker as soon as the server process is gone.

    A pidfd becomes readable when its process exits, zombie or not; kernels
    without pidfds get a once-a-second liveness poll instead.
    """
    try:
        pidfd = os.pidfd_open(server_pid)
    except ProcessLookupError:
        os._exit(0)
    except (OSError, AttributeError):
        pidfd = -1

    def watch() -> None:
        if pidfd >= 0:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll():
                pass
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(server_pid, 0)
                except ProcessLookupError:
                    break
        os._exit(0)

    threading.Thread(target=watch, name="aecho-server-watch", daemon=True).start()


def _resolve(name: str) -> Handler:
    """The handler for ``name``, imported once per worker.

    Raises:
        HandlerError: the name does not resolve in the worker.
    """
    handler = _handlers.get(name)
    if handler is None:
        handler = _handlers[name] = load_handler(name)
    return handler


def _ready(handler_name: str) -> int:
    """Warm-up task: resolve the handler now, return the worker's pid.

    Raises:
        HandlerError: the handler cannot be loaded in the worker.
    """
    _resolve(handler_name)
    return os.getpid()


def _run_batch(handler_name: str, packed: Packed) -> tuple[Packed, Failures, float]:
    """Run the handler on every message of a packed batch.

    Returns the packed replies (a failed message's reply is empty), the failures
    by index, and the seconds spent.

    Raises:
        HandlerError: the handler cannot be loaded in the worker.
    """
    handler = _handlers.get(handler_name) or _resolve(handler_name)
    out: list[bytes] = []
    append = out.append
    failures: Failures = {}
    started = time.perf_counter()
    for i, message in enumerate(unpack(packed)):
        try:
            reply = handler(message)
            if type(reply) is not bytes:
                reply = _as_bytes(reply)
            append(reply)
        except Exception as exc:
            failures[i] = (type(exc).__name__, str(exc))
            append(b"")
    return pack(out), failures, time.perf_counter() - started


def _as_bytes(reply: object) -> bytes:
    """Raises: TypeError: the handler returned something that is not bytes-like."""
    if isinstance(reply, bytes | bytearray | memoryview):
        return bytes(reply)
    raise TypeError(f"handler returned {type(reply).__name__}, not bytes")


# -- server side -----------------------------------------------------------------------------


class _Task:
    """One batch shipped to one worker: several submissions' messages, flattened.

    ``entries`` holds ``callback, token, count`` for each submission, as a flat
    list (no tuple per submission): the queue and the tasks sit between a read
    and its reply, and every container living that long feeds the garbage
    collector's youngest generation.
    """

    __slots__ = ("entries", "executor", "messages", "queued_at")

    def __init__(self, entries: list[Any], messages: list[bytes], queued_at: float) -> None:
        self.entries = entries
        self.messages = messages
        self.queued_at = queued_at  # when its oldest message was queued
        self.executor: ProcessPoolExecutor | None = None


class _Slot:
    """One worker process behind its own single-worker executor."""

    __slots__ = ("executor", "head_since", "index", "pid", "tasks")

    def __init__(self, index: int) -> None:
        self.index = index
        self.executor: ProcessPoolExecutor | None = None
        self.tasks: deque[_Task] = deque()
        self.head_since = 0.0
        self.pid: int | None = None


class PoolProcessor(Processor):
    """Runs the handler in worker processes, in batches; see the module docstring."""

    TASKS_PER_WORKER = 2
    MAX_BATCH = 1024
    # A task's round trip costs the server about this much beyond its messages; a
    # batch should carry at least that much work, up to MAX_MIN_BATCH messages.
    TASK_OVERHEAD_S = 0.0002
    MAX_MIN_BATCH = 512
    # A task is due back this long after it started, plus twice its expected work.
    DUE_GRACE_S = 0.005
    START_TIMEOUT_S = 60.0
    STOP_JOIN_S = 5.0

    def __init__(self, handler: Handler, handler_name: str, config: ServerConfig) -> None:
        super().__init__(handler, handler_name)
        self.size = config.effective_pool_size
        self.timeout = config.handler_timeout
        self._ctx = multiprocessing.get_context("forkserver")
        self._slots: list[_Slot] = []
        self._retired: list[ProcessPoolExecutor] = []
        # The queue: messages flat, and callback, token, count per submission, flat.
        self._messages: list[bytes] = []
        self._entries: list[Any] = []
        self._since = 0.0  # when the oldest queued message was queued
        self._flush_pending = False
        self._closing = False
        self._cost = 0.0  # moving average of worker seconds per message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._due_timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None  # set once no task is left, while closing

    @property
    def pids(self) -> list[int]:
        """Worker pids known to be running (for logs and tests)."""
        return [s.pid for s in self._slots if s.pid is not None]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and resolve the handler in each of them.

        Raises:
            HandlerError: the handler cannot be loaded in a worker.
            PoolError: the worker processes could not be started.
        """
        self._loop = asyncio.get_running_loop()
        self._ctx.set_forkserver_preload(["aecho.handlers"])
        self._slots = [_Slot(i) for i in range(self.size)]
        try:
            for slot in self._slots:
                slot.executor = self._new_executor()
            pids = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        asyncio.wrap_future(s.executor.submit(_ready, self.handler_name))
                        for s in self._slots
                        if s.executor is not None
                    )
                ),
                self.START_TIMEOUT_S,
            )
        except BaseException as exc:
            await self._stop_executors(kill=True)
            if isinstance(exc, HandlerError):
                raise
            if isinstance(exc, BrokenProcessPool | OSError | TimeoutError):
                raise PoolError(f"cannot start worker processes: {exc or 'timed out'}") from exc
            raise
        for slot, pid in zip(self._slots, pids, strict=True):
            slot.pid = pid
        log.info(
            "offload: %d worker processes (forkserver), handler %s, timeout %gs",
            self.size,
            self.handler_name,
            self.timeout,
        )
        self._watchdog = self._loop.call_later(self._tick_interval, self._tick)

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._ctx,
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for running batches, then stop every worker.

        Queued messages not yet shipped, and batches still running at the
        deadline, resolve with :class:`PoolClosed`.
        """
        if self._closing:
            return
        self._closing = True
        for timer in (self._watchdog, self._due_timer):
            if timer is not None:
                timer.cancel()
        closed = PoolClosed("the server is stopping")
        self._resolve_all(self._take(len(self._entries), len(self._messages)), closed)
        if any(s.tasks for s in self._slots):
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        busy = False
        for slot in self._slots:
            busy = busy or bool(slot.tasks)
            while slot.tasks:
                self._resolve_all(slot.tasks.popleft(), closed)
        await self._stop_executors(kill=busy)

    async def _stop_executors(self, kill: bool) -> None:
        executors = [s.executor for s in self._slots if s.executor is not None] + self._retired
        self._retired = []
        for slot in self._slots:
            slot.executor = None
        if kill:
            for executor in executors:
                _kill_workers(executor)

        def join() -> None:
            for executor in executors:
                executor.shutdown(wait=True, cancel_futures=True)

        try:
            await asyncio.wait_for(asyncio.to_thread(join), self.STOP_JOIN_S)
        except TimeoutError:
            log.warning("worker processes did not exit in %gs; killing them", self.STOP_JOIN_S)
            for executor in executors:
                _kill_workers(executor)

    # -- dispatch ----------------------------------------------------------------------------

    def submit_to(self, messages: list[bytes], callback: Callback, token: Any) -> None:
        if not self._flush_pending and not self._schedule_flush(callback, token, len(messages)):
            return
        self._messages += messages
        self._entries += (callback, token, len(messages))

    def submit_one(self, message: bytes, callback: Callback, token: Any) -> None:
        # The hot path with raw framing, once per read: no list, no tuple kept.
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
            loop.call_soon(_tell, callback, token, closed, 0, count)
            return False
        if not self._messages:
            self._since = loop.time()
        self._flush_pending = True
        loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_pending = False
        queued = len(self._messages)
        if not queued:
            return
        if self._closing:
            closed = PoolClosed("the server is stopping")
            self._resolve_all(self._take(len(self._entries), queued), closed)
            return
        # Free task positions, idle workers first, then those with one task running.
        positions = [
            slot
            for depth in range(self.TASKS_PER_WORKER)
            for slot in self._slots
            if len(slot.tasks) <= depth and slot.executor is not None
        ]
        if not positions:
            return
        cost = self._cost
        min_batch = (
            max(1, min(self.MAX_MIN_BATCH, math.ceil(self.TASK_OVERHEAD_S / cost)))
            if cost > 0
            else self.MAX_MIN_BATCH
        )
        if queued < min_batch and self._wait_for_a_return(positions[0]):
            return
        n_tasks = min(len(positions), max(1, math.ceil(queued / min_batch)))
        for i in range(n_tasks):
            queued = len(self._messages)
            if i == n_tasks - 1 and queued <= self.MAX_BATCH:
                # The rest of the queue; under load, usually the whole of it.
                task = self._take(len(self._entries), queued)
            else:
                target = min(self.MAX_BATCH, math.ceil(queued / (n_tasks - i)))
                entries = self._entries
                n_entries = n_messages = 0
                while n_entries < len(entries) and n_messages < target:
                    n_messages += entries[n_entries + 2]
                    n_entries += 3
                task = self._take(n_entries, n_messages)
            self._dispatch(positions[i], task)
            if not self._messages:
                break

    def _wait_for_a_return(self, first: _Slot) -> bool:
        """Whether a queue too small for a task of its own should wait.

        Like Nagle's algorithm: while a task is out and due back, wait for it to
        return, which flushes again.  So a handler cheaper than a task's overhead
        keeps to one task at a time, and its batches grow with the load.  A task
        out longer than it should take (a stuck or slow handler) does not hold the
        queue up beyond its due time: then an idle worker takes the queue.
        """
        if first.tasks:
            return True  # every worker is busy
        loop = self._loop
        assert loop is not None
        now = loop.time()
        due = [
            slot.head_since + self.DUE_GRACE_S + 2 * self._cost * len(slot.tasks[0].messages)
            for slot in self._slots
            if slot.tasks
        ]
        upcoming = [t for t in due if t > now]
        if not upcoming:
            return False
        if self._due_timer is None:
            self._due_timer = loop.call_at(min(upcoming), self._due)
        return True

    def _due(self) -> None:
        self._due_timer = None
        self._flush()

    def _take(self, n_entries: int, n_messages: int) -> _Task:
        """The queue's first ``n_entries`` entries (of ``n_messages`` messages), as a task."""
        if n_entries == len(self._entries):
            task = _Task(self._entries, self._messages, self._since)
            self._entries = []
            self._messages = []
        else:
            task = _Task(self._entries[:n_entries], self._messages[:n_messages], self._since)
            del self._entries[:n_entries]
            del self._messages[:n_messages]
        return task

    def _dispatch(self, slot: _Slot, task: _Task) -> None:
        assert self._loop is not None
        for attempt in range(2):
            executor = slot.executor
            assert executor is not None
            try:
                cfuture = executor.submit(_run_batch, self.handler_name, pack(task.messages))
                break
            except (BrokenProcessPool, RuntimeError) as exc:
                # The worker died after its last result and before this submit.
                if attempt:
                    self._resolve_all(task, WorkerDied(f"cannot start a worker: {exc}"))
                    return
                self._evict(slot, None)
        task.executor = executor
        if not slot.tasks:
            slot.head_since = self._loop.time()
        slot.tasks.append(task)
        cfuture.add_done_callback(functools.partial(self._from_thread, slot, task))

    def _from_thread(self, slot: _Slot, task: _Task, cfuture: ConcurrentFuture[Any]) -> None:
        # Runs in the executor's manager thread: hand over to the loop.
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._task_done, slot, task, cfuture)

    def _task_done(self, slot: _Slot, task: _Task, cfuture: ConcurrentFuture[Any]) -> None:
        if task.executor is not slot.executor or task not in slot.tasks:
            return  # settled already: its worker timed out or was replaced
        exc: BaseException | None = PoolClosed("cancelled") if cfuture.cancelled() else None
        if exc is None:
            exc = cfuture.exception()
        if isinstance(exc, BrokenProcessPool):
            self._evict(slot, WorkerDied("worker process died while handling this message"))
            self._flush()
            self._check_drained()
            return
        slot.tasks.remove(task)
        if slot.tasks:
            assert self._loop is not None
            slot.head_since = self._loop.time()
        if exc is not None:
            self._resolve_all(task, exc)
        else:
            packed, failures, seconds = cfuture.result()
            if task.messages:
                self._cost = 0.8 * self._cost + 0.2 * seconds / len(task.messages)
            self._resolve(task, unpack(packed), failures)
        if self._messages:
            self._flush()
        self._check_drained()

    def _check_drained(self) -> None:
        if self._drained is not None and not any(s.tasks for s in self._slots):
            self._drained.set()

    def _resolve(self, task: _Task, replies: list[bytes], failures: Failures) -> None:
        assert self._loop is not None
        stats = self.stats
        stats.messages += len(replies)
        stats.offload_latency.observe(self._loop.time() - task.queued_at, len(replies))
        outcomes: list[Outcome] = replies  # type: ignore[assignment]
        for index, (name, text) in failures.items():
            outcomes[index] = _failure(name, text)
        self._deliver(task.entries, outcomes)

    def _resolve_all(self, task: _Task, exc: BaseException) -> None:
        self.stats.messages += len(task.messages)
        self._deliver(task.entries, [exc] * len(task.messages))

    @staticmethod
    def _deliver(entries: list[Any], outcomes: list[Outcome]) -> None:
        """Tell every submission of a batch where its outcomes are."""
        start = 0
        triples = iter(entries)
        for callback, token, count in zip(triples, triples, triples, strict=True):
            stop = start + count
            # _tell, inlined: this runs once per read that was offloaded.
            try:
                callback(token, outcomes, start, stop)
            except Exception:
                log.exception("delivering offload results failed")
            start = stop

    # -- faults ------------------------------------------------------------------------------

    def _evict(self, slot: _Slot, exc: BaseException | None) -> None:
        """Replace the slot's worker.  Its running task fails with ``exc``; the
        tasks queued behind it go back to the front of the queue."""
        culprit = slot.tasks.popleft() if slot.tasks and exc is not None else None
        innocent = list(slot.tasks)
        slot.tasks.clear()
        old = slot.executor
        slot.executor = None
        if old is not None:
            _kill_workers(old)
            old.shutdown(wait=False, cancel_futures=True)
            self._retired = [e for e in self._retired if _has_workers(e)] + [old]
        self.stats.pool_restarts += 1
        if culprit is not None:
            log.warning(
                "worker %s: %s; %d messages failed, replacing the worker",
                slot.pid,
                exc,
                len(culprit.messages),
            )
            assert exc is not None
            self._resolve_all(culprit, exc)
        else:
            log.warning("worker %s died between tasks; replacing it", slot.pid)
        slot.pid = None
        if not self._closing:
            slot.executor = self._new_executor()
            warm = slot.executor.submit(_ready, self.handler_name)
            warm.add_done_callback(functools.partial(self._from_thread_warm, slot, slot.executor))
        for task in reversed(innocent):
            if self._closing:
                self._resolve_all(task, PoolClosed("the server is stopping"))
                continue
            if not self._messages or task.queued_at < self._since:
                self._since = task.queued_at
            self._entries[:0] = task.entries
            self._messages[:0] = task.messages

    def _from_thread_warm(
        self, slot: _Slot, executor: ProcessPoolExecutor, cfuture: ConcurrentFuture[int]
    ) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._warmed, slot, executor, cfuture)

    def _warmed(
        self, slot: _Slot, executor: ProcessPoolExecutor, cfuture: ConcurrentFuture[int]
    ) -> None:
        if slot.executor is executor and not cfuture.cancelled() and not cfuture.exception():
            slot.pid = cfuture.result()

    @property
    def _tick_interval(self) -> float:
        return max(0.05, min(1.0, self.timeout / 10))

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        evicted = False
        for slot in self._slots:
            if slot.tasks and now - slot.head_since > self.timeout:
                self._evict(
                    slot,
                    HandlerTimeout(f"handler ran longer than --handler-timeout {self.timeout:g}s"),
                )
                evicted = True
        if evicted:
            self._flush()
        if not self._closing:
            self._watchdog = loop.call_later(self._tick_interval, self._tick)


def _tell(callback: Callback, token: Any, outcomes: list[Outcome], start: int, stop: int) -> None:
    # One connection's failing callback must not keep the others of a batch waiting.
    try:
        callback(token, outcomes, start, stop)
    except Exception:
        log.exception("delivering offload results failed")


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no public way to stop a running call; killing its
    # process is the only way to take back a worker stuck in a handler.
    processes: dict[int, Any] = dict(getattr(executor, "_processes", None) or {})
    for process in processes.values():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.kill()


def _has_workers(executor: ProcessPoolExecutor) -> bool:
    return bool(getattr(executor, "_processes", None))
