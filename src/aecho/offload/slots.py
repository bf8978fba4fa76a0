"""The pool's bookkeeping: a batch in flight, and a position in the pool."""

from __future__ import annotations

from collections import deque
from typing import Any

from aecho.offload.link import Worker


class Task:
    """One batch shipped to one worker: several submissions' messages, flattened.

    ``entries`` holds ``callback, token, count`` for each submission, as a flat
    list (no tuple per submission): the queue and the tasks sit between a read
    and its reply, and every container living that long feeds the garbage
    collector's youngest generation.
    """

    __slots__ = ("entries", "messages", "queued_at")

    def __init__(self, entries: list[Any], messages: list[bytes], queued_at: float) -> None:
        self.entries = entries
        self.messages = messages
        self.queued_at = queued_at  # when its oldest message was queued


class Slot:
    """One position in the pool: the worker serving it now, and the tasks it holds.

    A worker runs its tasks in the order it was sent them, so the first task is the
    running one and the next result answers it.
    """

    __slots__ = ("head_since", "index", "tasks", "worker")

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: Worker | None = None
        self.tasks: deque[Task] = deque()
        self.head_since = 0.0  # when the first task started (or became the first)
