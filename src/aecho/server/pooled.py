"""The pooled protocol (``--offload process``): messages go to the worker pool, replies
leave in the order the messages arrived, and what a connection holds is bounded in bytes."""

from __future__ import annotations

from collections.abc import Callable

from aecho.config import MESSAGE_COST
from aecho.offload.outcomes import Outcome
from aecho.offload.pool import Pool
from aecho.server.budget import Budget
from aecho.server.connection import (
    PAUSE_SHARED,
    PAUSE_WINDOW,
    PAUSE_WRITE,
    FramedConnection,
    Host,
)
from aecho.server.framing import RawFramer

# A submission's token: its sequence number above TOKEN_SHIFT bits, the bytes it is
# charged below, so the charge comes back with the replies at no cost of a container.
TOKEN_SHIFT = 40
CHARGE_MASK = (1 << TOKEN_SHIFT) - 1


class PooledConnection(FramedConnection):
    """Each submission (the messages of one read) gets a sequence number, and replies
    are written strictly in that order: a submission whose batch comes back before an
    earlier one's waits in ``_early``, and the earlier one writes it.

    Every submission is charged its bytes plus MESSAGE_COST per message, against the
    connection's window (``--offload`` window, until its replies are written) and the
    server-wide :class:`Budget`.  Past the window reading pauses until half of it is
    free; past the budget the connection queues there until it is woken.  Replies are
    written whatever the write buffer holds, but a buffer above its high-water mark
    pauses reading, and messages already read wait in the backlog instead of going to
    the pool, so the buffer holds at most the mark plus the replies to one window.  Raw
    framing skips the framer (a chunk is the message, a reply goes back as it is).
    """

    __slots__ = (
        "_budget",
        "_early",
        "_encode",
        "_held",
        "_next_in",
        "_next_out",
        "_on_done",
        "_submit",
        "_submit_one",
        "_window",
    )

    def __init__(self, host: Host, pool: Pool, budget: Budget) -> None:
        super().__init__(host)
        # Bytes charged for submissions whose replies are not written yet.
        self._held = 0
        self._window = host.config.pool_window
        self._budget = budget
        self._next_in = 0  # sequence number of the next submission
        self._next_out = 0  # sequence number of the next submission to write
        self._early: dict[int, tuple[list[Outcome], int, int, int]] | None = None
        raw = isinstance(self._framer, RawFramer)
        self._encode: Callable[[bytes], bytes] | None = None if raw else self._framer.encode
        self._on_done = self._batch_done
        self._submit = pool.submit_to
        self._submit_one = pool.submit_one

    def data_received(self, data: bytes) -> None:
        if self._encode is not None:
            super().data_received(data)
            return
        self.active = True
        n = len(data)
        self.rx += n
        n += MESSAGE_COST
        held = self._held + n
        self._held = held
        budget = self._budget
        budget.held += n
        if held >= self._window or budget.held >= budget.limit:
            self._hold_back()
        seq = self._next_in
        self._next_in = seq + 1
        self._submit_one(data, self._on_done, seq << TOKEN_SHIFT | n)

    def _hold_back(self) -> None:
        """Stop reading: the window is full, or the server-wide budget is spent."""
        if self._held >= self._window:
            self._pause(PAUSE_WINDOW)
        if self._budget.held >= self._budget.limit and not self._paused & PAUSE_SHARED:
            self._pause(PAUSE_SHARED)
            self._budget.wait(self, holding=self._held > 0)

    def wake(self) -> bool:
        """The budget has room again (see :class:`Budget`)."""
        if self.transport is None or self.transport.is_closing():
            return False
        self._resume(PAUSE_SHARED)
        self._room_again()
        return True

    @property
    def _owes(self) -> bool:
        return bool(self._held) or super()._owes

    @property
    def working(self) -> bool:
        return bool(self._held)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._backlog = None
        # Replies parked behind an earlier one die here; the pool still returns the
        # rest, and each is released as it comes back.
        if self._early:
            self._budget.release(sum(entry[3] for entry in self._early.values()))
            self._early = None

    def _handle(self, messages: list[bytes], start: int) -> None:
        if self._paused & PAUSE_WRITE:
            # Replies can be many times their input (the sha256 of a short line): the
            # write buffer stays near its mark only if nothing more goes to the pool
            # until it drains (resume_writing takes the backlog up again).
            self._defer(messages, start)
            return
        budget = self._budget
        room = min(self._window - self._held, budget.limit - budget.held)
        if room <= 0:
            self._defer(messages, start)
            self._hold_back()
            return
        # No more than room // MESSAGE_COST + 1 messages can fit: only those are sized,
        # so a read of many small lines handed over in parts costs linear time.
        whole = messages
        end = len(whole)
        stop = min(end, start + room // MESSAGE_COST + 1)
        if start or stop < end:
            messages = whole[start:stop]
        count = len(messages)
        charge = sum(map(len, messages)) + MESSAGE_COST * count
        if charge > room and count > 1:
            # Submit about what fits (no less than one message); the rest waits.
            count = max(1, count * room // charge)
            messages = messages[:count]
            charge = sum(map(len, messages)) + MESSAGE_COST * count
        if start + count < end:
            self._defer(whole, start + count)
        seq = self._next_in
        self._next_in = seq + 1
        self._held += charge
        budget.held += charge
        if self._held >= self._window or budget.held >= budget.limit:
            self._hold_back()
        self._submit(messages, self._on_done, seq << TOKEN_SHIFT | charge)

    def _batch_done(self, token: int, outcomes: list[Outcome], start: int, stop: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self._budget.release(token & CHARGE_MASK)
            return
        seq = token >> TOKEN_SHIFT
        if seq != self._next_out:
            # An earlier submission is still out; it writes this one when it is back.
            if self._early is None:
                self._early = {}
            self._early[seq] = (outcomes, start, stop, token & CHARGE_MASK)
            return
        charge = token & CHARGE_MASK
        if stop - start == 1 and self._encode is None and not self._early:
            # The common case: one raw chunk, and next in line.
            reply = outcomes[start]
            if type(reply) is bytes:
                self._next_out = seq + 1
                self._held -= charge
                budget = self._budget
                budget.held -= charge
                if budget.waiters or budget.first:
                    budget.wake()
                self.tx += len(reply)
                transport.write(reply)
                if self._paused or self._eof:
                    self._after_write()
                return
        encode = self._encode
        early = self._early
        out: list[bytes] = []
        released = 0
        while True:
            for i in range(start, stop):
                outcome = outcomes[i]
                if isinstance(outcome, BaseException):
                    if not self._handler_failed(outcome, out):
                        self._budget.release(charge + released)
                        return
                else:
                    out.append(outcome if encode is None else encode(outcome))
            released += charge
            seq += 1
            if not early or seq not in early:
                break
            outcomes, start, stop, charge = early.pop(seq)
        self._next_out = seq
        self._held -= released
        self._budget.release(released)
        if out:
            payload = out[0] if len(out) == 1 else b"".join(out)
            self.tx += len(payload)
            transport.write(payload)
        self._after_write()

    def _after_write(self) -> None:
        """Replies were written: read again once half the window is free, take up the
        backlog, end after the last reply owed."""
        if self._held <= self._window // 2:
            if self._paused & PAUSE_WINDOW:
                self._resume(PAUSE_WINDOW)
            self._room_again()
        if self._eof and not self._owes:
            self._close_now()
