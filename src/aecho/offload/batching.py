"""How the pool cuts its queue into tasks: pure functions of counts, costs and times.

Per-task IPC costs about as much as 80 us of handler work here, so cheap handlers
need large batches while costly ones should be spread over every worker.  The pool
measures a message's cost in the worker (a moving average) and asks these functions
what to do; they know nothing of processes or event loops, so they are tested on
plain numbers and a fake clock.  docs/architecture.md tells the measurements behind
the constants.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Tasks a worker may hold: one running, one ready to start the moment it finishes.
TASKS_PER_WORKER = 2
MAX_BATCH = 1024
# A task's round trip costs the server about this much beyond its messages; a batch
# should carry at least that much work, up to MAX_MIN_BATCH messages.
TASK_OVERHEAD_S = 0.0002
MAX_MIN_BATCH = 512
# A task is due back this long after it started, plus twice its expected work.
DUE_GRACE_S = 0.005
# A task carries no more than this much expected work, so that a worker comes back for
# more often enough for the queue to be shared among connections (see Turns.take).
TASK_TIME_S = 0.02
# Before a message's cost is measured: a flood's first tasks are shared too.
UNMEASURED_TASK = 32
# Connections take turns once the queue holds more work than this (or its cost is
# unknown): below it, first come, first served keeps every wait that short anyway.
TURNS_AFTER_S = 0.05
# A task out this long, or this many times its expected work if that is longer, is late:
# its worker takes no more tasks, and what it holds that others can run goes to an idle
# worker (see aecho.offload.watch).  A hung handler holds up only its own connection.
LATE_AFTER_S = 0.05
LATE_FACTOR = 4


def min_batch(cost: float) -> int:
    """The smallest batch worth a task of its own, for messages costing ``cost`` seconds.

    Before anything was measured (cost 0) a task waits for the largest minimum.
    """
    if cost <= 0:
        return MAX_MIN_BATCH
    return max(1, min(MAX_MIN_BATCH, math.ceil(TASK_OVERHEAD_S / cost)))


def max_task(cost: float) -> int:
    """The most messages one task may carry: about TASK_TIME_S of work, at most MAX_BATCH."""
    if cost <= 0:
        return UNMEASURED_TASK
    return max(1, min(MAX_BATCH, int(TASK_TIME_S / cost)))


def take_turns(queued: int, capacity: int, cost: float, taking: bool) -> bool:
    """Whether ``queued`` messages, more than the free workers' ``capacity`` this time,
    should be shared out in turns (see Turns.take).  Once ``taking`` them, until the work
    queued falls under half the mark, so that the queue does not flap between the two."""
    if cost <= 0:
        return taking or queued > capacity
    if taking:
        return queued * cost > TURNS_AFTER_S / 2
    return queued > capacity and queued * cost > TURNS_AFTER_S


def task_count(queued: int, free_positions: int, smallest: int) -> int:
    """How many tasks to cut ``queued`` messages into, given free worker positions."""
    return min(free_positions, max(1, math.ceil(queued / smallest)))


def task_size(queued: int, tasks_left: int) -> int:
    """Messages for the next of ``tasks_left`` tasks: an even share, at most MAX_BATCH."""
    return min(MAX_BATCH, math.ceil(queued / tasks_left))


def due_at(started: float, cost: float, messages: int) -> float:
    """When a task that started at ``started`` should be back."""
    return started + DUE_GRACE_S + 2 * cost * messages


def next_return(due: Iterable[float], now: float) -> float | None:
    """The earliest time a running task is still due back after ``now``, or None.

    Like Nagle's algorithm: a queue too small for a task of its own waits while a
    task is out and due back, since its return flushes again; so a handler cheaper
    than a task's overhead keeps to one task at a time, and its batches grow with
    the load.  A task out longer than it should take (a stuck or slow handler) does
    not hold the queue up beyond its due time: then an idle worker takes the queue.
    """
    upcoming = [t for t in due if t > now]
    return min(upcoming) if upcoming else None


def late_at(started: float, cost: float, messages: int) -> float:
    """When a task that started at ``started`` is late (see LATE_AFTER_S)."""
    return started + max(LATE_AFTER_S, LATE_FACTOR * cost * messages)
