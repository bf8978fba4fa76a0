"""The pool's bookkeeping: a batch in flight, a position in the pool, what it counts."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

from aecho.offload.link import Worker
from aecho.offload.outcomes import HandlerTimeout, Outcome

log = logging.getLogger("aecho.offload")


class Latency(Protocol):
    def observe(self, seconds: float, n: int = 1) -> None: ...


class Counters(Protocol):
    """The counters the pool keeps (the server hands over its own)."""

    messages: int
    pool_restarts: int

    @property
    def offload_latency(self) -> Latency: ...


def discard(_token: Any, _outcomes: list[Outcome], _start: int, _stop: int) -> None:
    """The callback of a submission given back from a late task (see turns.give_back):
    another task runs it, so what this one brings back for it goes nowhere."""


class Task:
    """One batch shipped to one worker: several submissions' messages, flattened.

    ``entries`` holds ``callback, token, count`` for each submission, as a flat
    list (no tuple per submission): the queue and the tasks sit between a read
    and its reply, and every container living that long feeds the garbage
    collector's youngest generation.  ``dropped`` messages belong to submissions
    given back (their callback is :func:`discard`).
    """

    __slots__ = ("ages", "alone", "dropped", "entries", "messages", "queued_at")

    def __init__(
        self,
        entries: list[Any],
        messages: list[bytes],
        queued_at: float,
        alone: bool = False,
        ages: list[float] | None = None,
    ) -> None:
        self.entries = entries
        self.messages = messages
        self.queued_at = queued_at  # when its oldest message was queued
        # One submission, run again on its own after a batch it shared killed its worker.
        self.alone = alone
        # When each submission was queued (flat: time, count, ...), if they differ much.
        self.ages = ages
        self.dropped = 0

    def waited(self, now: float, latency: Latency) -> None:
        """Book each message's time from its queueing to ``now``."""
        if self.ages is None:
            latency.observe(now - self.queued_at, len(self.messages))
            return
        pairs = iter(self.ages)
        for since, count in zip(pairs, pairs, strict=True):
            latency.observe(now - since, int(count))

    def deliver(self, outcomes: list[Outcome]) -> None:
        """Tell every submission where its outcomes are: ``outcomes[start:stop]``."""
        start = 0
        triples = iter(self.entries)
        for callback, token, count in zip(triples, triples, triples, strict=True):
            stop = start + count
            # One connection's failing callback must not keep the others waiting.  The
            # try is inline: this loop runs once per message on the raw path.
            try:
                callback(token, outcomes, start, stop)
            except Exception:
                log.exception("delivering offload results failed")
            start = stop

    def kept(self) -> Task:
        """This task without the submissions given back."""
        if not self.dropped:
            return self
        entries: list[Any] = []
        messages: list[bytes] = []
        ages: list[float] = []
        start = 0
        for k in range(0, len(self.entries), 3):
            callback, token, count = self.entries[k : k + 3]
            if callback is not discard:
                entries += (callback, token, count)
                messages += self.messages[start : start + count]
                ages += self.ages[2 * k // 3 : 2 * k // 3 + 2] if self.ages else ()
            start += count
        return Task(entries, messages, self.queued_at, self.alone, ages or None)

    def split(self) -> list[Task]:
        """One task per submission, each marked ``alone``."""
        tasks = []
        start = 0
        triples = iter(self.entries)
        for callback, token, count in zip(triples, triples, triples, strict=True):
            stop = start + count
            tasks.append(
                Task([callback, token, count], self.messages[start:stop], self.queued_at, True)
            )
            start = stop
        return tasks


LATE, GAVE_BACK = 1, 2


class Slot:
    """One position in the pool: the worker serving it now, and the tasks it holds.

    A worker runs its tasks in the order it was sent them, so the first task is the
    running one and the next result answers it.
    """

    __slots__ = ("head_since", "index", "late", "tasks", "worker")

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: Worker | None = None
        self.tasks: deque[Task] = deque()
        self.head_since = 0.0  # when the first task started (or became the first)
        # Whether the first task is late (see aecho.offload.watch): 0 not, LATE, or
        # GAVE_BACK once what others can run was taken from it.  A late slot takes no task.
        self.late = 0

    def overdue(self, now: float, timeout: float, start_timeout: float) -> Exception | None:
        """What the running task fails with if it has been out too long, else None.

        Its clock starts when it became the first task and its worker was ready: a
        replacement still starting (importing the handler) has run nothing yet.  One
        not ready ``start_timeout`` after it was started is given up all the same.
        """
        worker = self.worker
        if not self.tasks or worker is None:
            return None
        if not worker.ready:
            if now - worker.since > start_timeout:
                return HandlerTimeout(f"worker process did not start in {start_timeout:g}s")
            return None
        if now - max(self.head_since, worker.since) > timeout:
            return HandlerTimeout(f"handler ran longer than --handler-timeout {timeout:g}s")
        return None
