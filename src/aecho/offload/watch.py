"""The pool's watch over the tasks its workers are running: when each is due back, and
when it is late.

A queue too small for a task of its own waits while a task is out and still due back
(see :func:`aecho.offload.batching.next_return`).  A task that is late (see
:func:`aecho.offload.batching.late_at`: a handler that hangs, or runs far longer than its
kind did so far) stops its worker from taking new tasks, and once a worker is idle the
late one gives back what others can run (:func:`aecho.offload.turns.give_back`): the
tasks queued behind the late one, and the other connections' messages of the late
task itself.  A late worker still runs what it was sent, since it may be slow rather
than stuck; it keeps the connection whose message it is on, so a message that hangs
still meets ``--handler-timeout``, but no other connection waits for it while a worker
is free.  A message given back that its late worker had already handled is handled
again: at least once, as after a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aecho.offload import batching
from aecho.offload.slots import GAVE_BACK, LATE, Slot, Task
from aecho.offload.turns import give_back

log = logging.getLogger("aecho.offload")


class Watch:
    """Two timers over ``slots``: one that flushes when a task is due back (``on_due``),
    one that marks the slots whose first task is late (``slot.late``, which the pool
    clears when that task is back or its worker gone) and calls ``on_late``.

    ``cost`` is the measured cost of a message, as last given.  Whenever a worker becomes
    idle, :meth:`take_back` says what late slots give back to it.
    """

    __slots__ = ("_due", "_late", "_loop", "_on_due", "_on_late", "_slots", "cost")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        slots: list[Slot],
        on_due: Callable[[], None],
        on_late: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._slots = slots
        self._on_due = on_due
        self._on_late = on_late
        self._due: asyncio.TimerHandle | None = None
        self._late: asyncio.TimerHandle | None = None
        self.cost = 0.0

    def cancel(self) -> None:
        for timer in (self._due, self._late):
            if timer is not None:
                timer.cancel()

    # -- due ---------------------------------------------------------------------------------

    def wait_for_a_return(self, first: Slot) -> bool:
        """Whether a queue too small for a task of its own should wait (see batching);
        ``first`` is the first free position."""
        if first.tasks:
            return True  # every worker is busy
        wake = batching.next_return(
            (
                batching.due_at(slot.head_since, self.cost, len(slot.tasks[0].messages))
                for slot in self._slots
                if slot.tasks
            ),
            self._loop.time(),
        )
        if wake is None:
            return False
        if self._due is None:
            self._due = self._loop.call_at(wake, self._flush)
        return True

    def _flush(self) -> None:
        self._due = None
        self._on_due()

    # -- late --------------------------------------------------------------------------------

    def started(self, slot: Slot, now: float, cost: float) -> None:
        """``slot``'s first task started at ``now`` (it was sent, or became the first)."""
        slot.head_since = now
        self.cost = cost
        self._check_at(batching.late_at(now, cost, len(slot.tasks[0].messages)))

    def _check_at(self, when: float) -> None:
        timer = self._late
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._late = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._late = None
        now = self._loop.time()
        wake = None
        late = 0
        for slot in self._slots:
            if not slot.tasks or slot.late:
                continue
            at = batching.late_at(slot.head_since, self.cost, len(slot.tasks[0].messages))
            if at <= now:
                slot.late = late = LATE
            elif wake is None or at < wake:
                wake = at
        if wake is not None:
            self._check_at(wake)
        if late:
            self._on_late()

    def take_back(self) -> list[Task]:
        """If a worker is idle, what the late slots give back, first in line first."""
        slots = self._slots
        if all(s.late != LATE for s in slots) or all(s.tasks or not s.worker for s in slots):
            return []
        back: list[Task] = []
        for slot in slots:
            if slot.late != LATE:
                continue
            slot.late = GAVE_BACK
            late = slot.worker
            running = late.running() if late is not None else None
            tasks = list(slot.tasks)
            parts = [give_back(tasks[0], running)] if running is not None else []
            parts += [give_back(task) for task in tasks[1:]]
            given = [part for part in parts if part is not None]
            if given:
                log.debug("worker %s is late; others run what it held", late and late.pid)
            back += given
        return back
