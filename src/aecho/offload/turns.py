"""Connections take turns at the pool: what a flush leaves queued waits by connection, and
each task is shared among the connections with messages waiting.

First come, first served had one peer's message wait behind every message of a peer that
floods a costly handler.  docs/architecture.md ("Connections take turns") has the figures.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from aecho.offload.link import Worker
from aecho.offload.outcomes import Outcome, WorkerDied
from aecho.offload.slots import Task, discard


class Gather:
    """A submission the pool cut into parts (see :meth:`Turns.take`): the parts' outcomes are
    put back together and handed over once, as the one submission's.

    Each part is queued as ``receive, offset, count``: the offset of its first message in
    the submission stands where the submission's token stood.
    """

    __slots__ = ("callback", "missing", "outcomes", "token")

    def __init__(self, callback: Any, token: Any, count: int) -> None:
        self.callback = callback
        self.token = token
        self.outcomes: list[Outcome] = [None] * count  # type: ignore[list-item]
        self.missing = count

    def receive(self, offset: int, outcomes: list[Outcome], start: int, stop: int) -> None:
        self.outcomes[offset : offset + stop - start] = outcomes[start:stop]
        self.missing -= stop - start
        if not self.missing:
            self.callback(self.token, self.outcomes, 0, len(self.outcomes))


def owner(callback: Any) -> Any:
    """Whom a queued submission belongs to: the object its callback is bound to (a
    connection), through a :class:`Gather` if the pool cut the submission."""
    bound = getattr(callback, "__self__", callback)
    if type(bound) is Gather:
        return getattr(bound.callback, "__self__", bound.callback)
    return bound


def blame(
    tasks: deque[Task], exc: BaseException | None, worker: Worker | None
) -> tuple[Task | None, list[Task]]:
    """Empty ``tasks``, those of a worker that died or ran past its timeout (``exc``; None:
    it died between tasks): the running task's part to blame, and the parts to run again.

    The part to blame is the running task less what it gave back (see :func:`give_back`).
    But a late worker goes on to the messages it gave back, since it was sent them: one
    that kills or hangs it there is to blame where it runs again, on the worker it was
    given to.  So if the message the worker was on (its progress word says which) is one
    it gave back, nothing of its task is to blame (None, as when nothing was running): what
    it kept runs again with the tasks queued behind it, rather than fail in that one's
    place.  Without a progress word, what it kept is to blame, as before anything was
    given back.
    """
    head = tasks.popleft() if tasks and exc is not None else None
    innocent = [kept for task in tasks if (kept := task.kept()).entries]
    tasks.clear()
    if head is None:
        return None, innocent
    kept = head.kept()
    if head.dropped and worker is not None and _gave_back(head, worker.running()):
        return None, [kept, *innocent] if kept.entries else innocent
    return kept, innocent


def _gave_back(task: Task, index: int | None) -> bool:
    """Whether ``task``'s message at ``index`` (None: not known) was given back."""
    if index is None:
        return False
    entries = task.entries
    end = 0
    for k in range(0, len(entries), 3):
        end += entries[k + 2]
        if index < end:
            return entries[k] is discard
    return False


def suspects_of(task: Task, exc: BaseException | None) -> list[Task]:
    """The parts to run again, each alone, of a task whose worker died (one per
    submission) or ran past its timeout (one per connection: a submission each would wait
    out the timeout in turn, with everything queued behind them)."""
    if isinstance(exc, WorkerDied):
        return task.split()
    parts: dict[Any, Task] = {}
    start = 0
    triples = iter(task.entries)
    for callback, token, count in zip(triples, triples, triples, strict=True):
        part = parts.get(whose := owner(callback))
        if part is None:
            part = parts[whose] = Task([], [], task.queued_at, alone=True)
        part.entries += (callback, token, count)
        part.messages += task.messages[start : start + count]
        start += count
    return list(parts.values())


def give_back(task: Task, running: int | None = None) -> Task | None:
    """Take out of ``task``, held by a worker that is late, what another worker may run:
    with ``running`` (the index of the message the worker is on) every other connection's
    submissions, done or not; without it, all of them (the worker has not started it).

    They come back as a task of their own (None: nothing to give); in ``task`` their
    callback becomes :func:`discard`, so a late result of theirs goes nowhere, and their
    messages empty bytes.  The messages already done are handled again: at least once,
    as after a crash.
    """
    entries, messages = task.entries, task.messages
    ages = task.ages or [task.queued_at, 0] * (len(entries) // 3)
    spared = None
    if running is not None:
        end = 0
        for k in range(0, len(entries), 3):
            end += entries[k + 2]
            if running < end:
                spared = owner(entries[k])
                break
    out = Task([], [], task.queued_at, task.alone, [])
    assert out.ages is not None
    start = 0
    for k in range(0, len(entries), 3):
        callback, token, count = entries[k : k + 3]
        at = start
        start += count
        if callback is discard or (running is not None and owner(callback) is spared):
            ages[2 * k // 3 + 1] = 0 if callback is discard else count
            continue
        out.entries += (callback, token, count)
        out.messages += messages[at:start]
        messages[at:start] = [b""] * count  # held once, as the budget counts them
        out.ages += (ages[2 * k // 3], count)
        entries[k] = discard
        ages[2 * k // 3 + 1] = 0
        task.dropped += count
    if not out.entries:
        return None
    task.ages = ages
    out.queued_at = min(out.ages[::2])
    return out


class Turns:
    """Submissions waiting by connection.  Each is ``[callback, token, count, messages,
    when queued]``; ``order`` is the order of turns, a connection in it once."""

    __slots__ = ("messages", "order", "queues")

    def __init__(self) -> None:
        self.queues: dict[Any, deque[list[Any]]] = {}
        self.order: deque[Any] = deque()
        self.messages = 0  # messages waiting

    def add(self, queued: Task) -> None:
        """Queue ``queued``'s submissions, each after what its connection has waiting.
        Each submission is moved here once, so a long queue costs nothing more per task
        taken from it."""
        queues = self.queues
        entries, messages, since = queued.entries, queued.messages, queued.queued_at
        at = 0
        for k in range(0, len(entries), 3):
            callback, token, count = entries[k : k + 3]
            whose = owner(callback)
            queue = queues.get(whose)
            if queue is None:
                queue = queues[whose] = deque()
                self.order.append(whose)
            queue.append([callback, token, count, messages[at : at + count], since])
            at += count
        self.messages += at

    def put_back(self, task: Task) -> None:
        """Queue a task that was sent out, each submission before what its connection has
        waiting, and the connections new here first in the order."""
        staged = Turns()
        staged.add(task)
        for whose in reversed(staged.order):
            queue = self.queues.get(whose)
            if queue is None:
                self.queues[whose] = staged.queues[whose]
                self.order.appendleft(whose)
            else:
                queue.extendleft(reversed(staged.queues[whose]))
        self.messages += staged.messages

    def take(self, target: int) -> Task:
        """A task of up to ``target`` messages, shared among the connections waiting.

        Connections take turns: each takes up to an even share of the task, from its
        oldest messages on, then goes to the back of the order if it has more.  A
        submission taken in part is cut in two (a :class:`Gather` puts its outcomes
        together again) and its rest keeps its place.  A connection's messages keep their
        order; between connections, order need not hold, since each connection writes its
        replies in its own order.
        """
        queues, order = self.queues, self.order
        share = max(1, target // max(1, len(order)))
        left = target
        entries: list[Any] = []
        messages: list[bytes] = []
        ages: list[float] = []
        while left and order:
            whose = order.popleft()
            queue = queues[whose]
            want = min(share, left)
            while want and queue:
                item = queue[0]
                callback, token, count, part, since = item
                if count <= want:
                    queue.popleft()
                    entries += (callback, token, count)
                    messages += part
                    ages += (since, count)
                    want -= count
                    left -= count
                    continue
                if type(getattr(callback, "__self__", None)) is not Gather:
                    callback, token = Gather(callback, token, count).receive, 0
                entries += (callback, token, want)
                messages += part[:want]
                ages += (since, want)
                item[:] = (callback, token + want, count - want, part[want:], since)
                left -= want
                want = 0
            if queue:
                order.append(whose)  # to the back of the order
            else:
                del queues[whose]
        self.messages -= target - left
        return Task(entries, messages, min(ages[::2], default=0.0), ages=ages)

    def take_all(self, queued: Task) -> Task:
        """Everything waiting, and after it what the pool had queued, as one task."""
        entries: list[Any] = []
        messages: list[bytes] = []
        for queue in self.queues.values():
            for callback, token, count, part, _ in queue:
                entries += (callback, token, count)
                messages += part
        self.queues.clear()
        self.order.clear()
        self.messages = 0
        return Task(entries + queued.entries, messages + queued.messages, queued.queued_at)
