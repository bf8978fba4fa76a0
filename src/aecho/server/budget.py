"""The server-wide bound on bytes held for the worker pool, and who reads next when it frees.

Pure bookkeeping, no asyncio: pooled connections add what they submit to ``held`` and
take it back once the replies are written.  A connection that finds ``held`` at the
limit stops reading and queues here; as replies are written and ``held`` falls, queued
connections are woken first come, first served, as many as the room left could take
one read each, those that held nothing for the pool when they stopped first.
docs/architecture.md ("Memory bounds") says why it is built this way.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

# What a woken connection is expected to read before it pauses again: one read of the
# event loop (asyncio and uvloop both read up to 256 KiB at a time).
READ_ESTIMATE = 256 * 1024
# What a connection that held nothing is expected to take when woken: what it read
# before it stopped, handed over as far as the room goes (at least one message).
FIRST_ESTIMATE = 4096


class Waiter(Protocol):
    def wake(self) -> bool:
        """Read again; False when the connection is gone (it takes no room)."""
        ...


class Budget:
    """Bytes held for the pool by every connection of one server, and the connections
    waiting for room.

    The hot paths touch ``held``, ``limit`` and ``waiters`` directly: a few integer
    operations per submission and per written reply, a call only when someone waits.
    """

    __slots__ = ("_step", "first", "held", "limit", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        # Connections queued for room, first come first served.
        self.waiters: deque[Waiter] = deque()
        # Those that held nothing when they stopped: a peer's first message behind
        # connections that fill the budget.  Woken before the others, at any room.
        self.first: deque[Waiter] = deque()
        # Room a woken connection is expected to take; a small limit (tests) still wakes.
        self._step = max(1, min(READ_ESTIMATE, limit // 4))

    @property
    def waiting(self) -> int:
        """Connections queued for room (for tests and metrics)."""
        return len(self.waiters) + len(self.first)

    def wait(self, conn: Waiter, holding: bool = True) -> None:
        """Queue ``conn``, which has stopped reading, until there is room; ahead of those
        ``holding`` some if it holds nothing."""
        (self.waiters if holding else self.first).append(conn)

    def release(self, n: int) -> None:
        """``n`` bytes are no longer held: wake waiters the room left can take.

        The raw pooled path does the same inline: ``held -= n``, then :meth:`wake`
        only when someone waits.
        """
        self.held -= n
        if self.waiters or self.first:
            self.wake()

    def wake(self) -> None:
        """Wake waiters, first come first served, as many as the room left could take."""
        # Each woken connection may read about READ_ESTIMATE before it sees the limit
        # again, so the limit is overshot by at most one read per connection woken or
        # reading at that moment.  Connections gone meanwhile are skipped at no cost.
        room = self.limit - self.held
        first = self.first
        while first and room > 0:
            if first.popleft().wake():
                room -= FIRST_ESTIMATE
        waiters = self.waiters
        while waiters and room >= self._step:
            if waiters.popleft().wake():
                room -= self._step
