"""The pool's bookkeeping: a batch in flight, a worker process, a position in the pool."""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any


class Task:
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


class Worker:
    """A worker process, known by a pidfd once it has said its pid (never reused)."""

    __slots__ = ("executor", "pid", "pidfd")

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor
        self.pid: int | None = None
        self.pidfd = -1

    def known(self, pid: int) -> None:
        self.pid = pid
        with contextlib.suppress(OSError, AttributeError):
            self.pidfd = os.pidfd_open(pid)

    def kill(self) -> None:
        """SIGKILL the process, the only way to take back a worker stuck in a handler.

        Through the pidfd, so a pid the kernel has since given to another process is
        never signalled.  A worker that never said its pid is stopped by its executor
        and, failing that, exits with the server (see :func:`aecho.offload.worker.init`).
        """
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def release(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


class Slot:
    """One position in the pool: the worker serving it now, and the tasks it holds."""

    __slots__ = ("head_since", "index", "tasks", "worker")

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: Worker | None = None
        self.tasks: deque[Task] = deque()
        self.head_since = 0.0

    @property
    def executor(self) -> ProcessPoolExecutor | None:
        return self.worker.executor if self.worker is not None else None


def exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (its pidfd polls readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
