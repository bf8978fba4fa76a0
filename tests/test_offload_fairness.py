"""The worker pool shares its queue among connections: one that floods it with messages
does not keep another's message waiting behind its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import pytest

from aecho.config import Framing, Offload
from aecho.offload import batching
from aecho.offload.link import Worker
from aecho.offload.outcomes import Outcome, WorkerDied
from aecho.offload.pool import Pool
from aecho.offload.slots import Task, discard
from aecho.offload.turns import Turns, blame, give_back
from aecho.server.server import Server
from aecho.server.stats import Stats
from tests.conftest import running_server

TIMEOUT = 60.0
T = "tests.handlers_for_tests:"


class Submitter:
    """Stands for a connection: the pool tells connections apart by their callbacks' owner.

    ``first`` is done at its first delivery, ``complete`` once ``expected`` replies are in;
    every delivery is written in ``log`` (shared) under ``name``.
    """

    def __init__(self, name: int, expected: int, log: list[int]) -> None:
        self.name = name
        self.expected = expected
        self.log = log
        self.calls: list[list[Outcome]] = []
        loop = asyncio.get_running_loop()
        self.first = loop.create_future()
        self.complete = loop.create_future()

    def deliver(self, _token: object, outcomes: list[Outcome], start: int, stop: int) -> None:
        self.calls.append(outcomes[start:stop])
        self.log.append(self.name)
        if not self.first.done():
            self.first.set_result(None)
        if sum(map(len, self.calls)) == self.expected:
            self.complete.set_result(None)


@pytest.mark.asyncio
async def test_a_message_queued_behind_a_flood_goes_in_the_next_task() -> None:
    """One connection submits 3,000 messages, another one message, in one loop iteration.
    The second is in the first task; the first comes back once, whole and in order, though
    the pool cut it into parts."""
    pool = Pool(T + "costly_upper", size=1, timeout=30, stats=Stats())
    await pool.start()
    try:
        log: list[int] = []
        flood, probe = Submitter(0, 3000, log), Submitter(1, 1, log)
        messages = [b"m%d" % i for i in range(3000)]
        pool.submit_to(messages, flood.deliver, "flood")
        pool.submit_one(b"probe", probe.deliver, "probe")
        await asyncio.wait_for(flood.complete, TIMEOUT)
        assert log == [1, 0]  # first come, first served would answer the flood first
        assert probe.calls == [[b"PROBE"]]
        assert flood.calls == [[m.upper() for m in messages]]
    finally:
        await pool.close(0)


@pytest.mark.asyncio
async def test_connections_take_turns_when_tasks_are_smaller_than_their_queues() -> None:
    """Four connections with 600 messages each, every task smaller than what they queued:
    each connection gets its turn, so all four finish close together rather than one after
    another."""
    pool = Pool(T + "costly_upper", size=1, timeout=30, stats=Stats())
    await pool.start()
    try:
        log: list[int] = []
        owners = [Submitter(i, 600, log) for i in range(4)]
        for i, who in enumerate(owners):
            for k in range(0, 600, 50):  # as reads of 50 messages each
                pool.submit_to([b"c%d-%d" % (i, k + j) for j in range(50)], who.deliver, k)
        await asyncio.wait_for(asyncio.gather(*(who.complete for who in owners)), TIMEOUT)
        for i, who in enumerate(owners):
            assert len(who.calls) == 12  # each submission answered once
            got = [reply for call in who.calls for reply in call if isinstance(reply, bytes)]
            assert sorted(got) == sorted(b"C%d-%d" % (i, k) for k in range(600))
        # In turns, every connection has its first reply before any has its last.
        first_replies = [log.index(i) for i in range(4)]
        last_replies = [len(log) - 1 - log[::-1].index(i) for i in range(4)]
        assert max(first_replies) < min(last_replies), log
        assert pool.stats.messages == 2400
    finally:
        await pool.close(0)


@pytest.mark.asyncio
async def test_a_worker_dying_under_part_of_a_cut_submission_fails_that_part_only() -> None:
    """The flood's submission is cut into parts; the worker dies under the part holding
    ``crash``.  The submission still comes back once, every message in its place: that
    part's messages as WorkerDied, the others echoed."""
    pool = Pool(T + "costly_crash", size=1, timeout=30, stats=Stats())
    await pool.start()
    try:
        log: list[int] = []
        flood, probe = Submitter(0, 3000, log), Submitter(1, 1, log)
        messages = [b"crash" if i == 1500 else b"m%d" % i for i in range(3000)]
        pool.submit_to(messages, flood.deliver, "flood")
        pool.submit_one(b"probe", probe.deliver, "probe")
        await asyncio.wait_for(asyncio.gather(flood.complete, probe.complete), TIMEOUT)
        assert probe.calls == [[b"probe"]]
        [outcomes] = flood.calls
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert 1500 in failed and failed == list(range(failed[0], failed[-1] + 1))
        assert len(failed) <= batching.MAX_BATCH
        assert {type(outcomes[i]).__name__ for i in failed} == {"WorkerDied"}
        assert all(outcomes[i] == messages[i] for i in range(3000) if i not in failed)
        assert pool.stats.pool_restarts == 1
    finally:
        await pool.close(0)


async def _probe_behind_a_flood(
    server: Server, flooders: int, under_way_at: int
) -> tuple[int, int]:
    """``flooders`` peers each pipeline 3,000 2-byte lines and read the replies; once
    ``under_way_at`` replies are in, another peer sends one line.  Returns how many flood
    replies came in between its sending and its reply, and how many connections waited
    for the pool's budget just before it was sent."""
    received = 0
    under_way = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def flood() -> None:
        nonlocal received
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writers.append(writer)
        writer.write(b"a\n" * 3000)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            received += data.count(b"\n")
            if received >= under_way_at:
                under_way.set()

    flooding = [asyncio.create_task(flood()) for _ in range(flooders)]
    try:
        await asyncio.wait_for(under_way.wait(), TIMEOUT)
        waiting = server.budget.waiting
        probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", server.port)
        sent_at = received
        probe_writer.write(b"probe\n")
        assert await asyncio.wait_for(probe_reader.readline(), TIMEOUT) == b"probe\n"
        behind = received - sent_at
        probe_writer.close()
        return behind, waiting
    finally:
        for task in flooding:
            task.cancel()
        for writer in writers:
            writer.close()
        for task in flooding:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task


class Owner:
    """A connection as Turns sees it: the owner of a bound callback."""

    def __init__(self, name: str) -> None:
        self.name = name

    def done(self, token: object, outcomes: list[Outcome], start: int, stop: int) -> None:
        raise AssertionError("not delivered in this test")


def _queue(*submissions: tuple[Owner, int]) -> Task:
    entries: list[object] = []
    messages: list[bytes] = []
    for who, count in submissions:
        entries += (who.done, who.name, count)
        messages += [b"%s%d" % (who.name.encode(), i) for i in range(count)]
    return Task(entries, messages, 1.0)


def _owners(task: Task) -> list[str]:
    return [m[:1].decode() for m in task.messages]


def test_turns_serve_each_connection_in_order_and_send_the_served_to_the_back() -> None:
    a, b, c, d = (Owner(n) for n in "abcd")
    turns = Turns()
    turns.add(_queue((a, 100), (b, 100), (c, 100)))
    assert _owners(turns.take(3)) == ["a", "b", "c"]
    turns.add(_queue((d, 1)))  # comes last: waits for one round at most
    assert _owners(turns.take(2)) == ["a", "b"]
    assert _owners(turns.take(2)) == ["c", "d"]
    assert _owners(turns.take(2)) == ["a", "b"]
    # Within a connection, the order of its messages holds.
    task = turns.take(300)
    assert [m for m in task.messages if m.startswith(b"a")] == [b"a%d" % i for i in range(3, 100)]
    assert turns.messages == 0 and not turns.queues


def test_an_even_share_is_taken_and_a_submission_cut_where_it_ends() -> None:
    a, b = Owner("a"), Owner("b")
    turns = Turns()
    turns.add(_queue((a, 10), (a, 10), (b, 3)))
    task = turns.take(8)  # shares of 4: a's first submission is cut, b's taken whole
    assert task.messages == [b"a0", b"a1", b"a2", b"a3", b"b0", b"b1", b"b2", b"a4"]
    assert turns.messages == 15
    # The cut submission's parts name their offsets in it, for the Gather.
    assert task.entries[1::3] == [0, "b", 4] and task.entries[2::3] == [4, 3, 1]
    rest = turns.take_all(_queue()).entries
    assert rest[1::3] == [5, "a"] and rest[2::3] == [5, 10]


@pytest.mark.asyncio
async def test_a_peer_whose_messages_hang_fails_alone() -> None:
    """One connection floods a handler with messages that hang; another's message,
    sharing a task with them, runs again in a task of its own and is answered."""
    pool = Pool(T + "hang", size=1, timeout=0.5, stats=Stats())
    await pool.start()
    try:
        log: list[int] = []
        flood, peer = Submitter(0, 100, log), Submitter(1, 1, log)
        pool.submit_to([b"hang"] * 100, flood.deliver, "flood")
        pool.submit_one(b"hello", peer.deliver, "peer")
        await asyncio.wait_for(peer.complete, TIMEOUT)
        assert peer.calls == [[b"hello"]]
        # The flood's first task failed, then its part alone failed again: two timeouts.
        assert pool.stats.pool_restarts == 2
    finally:
        await pool.close(0)


HANG_TIMEOUT = 2.0  # --handler-timeout of the tests below; a free worker answers far sooner

Peer = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def served_peers(port: int, n: int) -> AsyncIterator[list[Peer]]:
    """``n`` connections, each served one line first (and the cost measured); closed after."""
    peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    try:
        for reader, writer in peers:
            writer.write(b"hi\n")
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"hi\n"
        yield peers
    finally:
        for _, writer in peers:
            writer.close()


@pytest.mark.asyncio
async def test_a_message_that_hangs_holds_up_no_other_connection_while_a_worker_is_free() -> None:
    """Two workers.  One peer's line hangs; three others send theirs in the same loop
    iteration, so that the four share a task.  Once that task is late, its worker keeps
    the hung line and gives the others back: the free worker answers them long before
    --handler-timeout, and the hung line alone meets it, once."""
    async with (
        running_server(
            offload=Offload.process,
            pool_size=2,
            framing=Framing.line,
            handler=T + "hang",
            handler_timeout=HANG_TIMEOUT,
        ) as server,
        served_peers(server.port, 4) as peers,
    ):
        (hung_reader, hung), *others = peers
        started = time.monotonic()
        hung.write(b"hang\n")
        for _, writer in others:  # no await between: the server reads all four at once
            writer.write(b"ok\n")
        for reader, _ in others:
            line = await asyncio.wait_for(reader.readline(), HANG_TIMEOUT / 2)
            assert line == b"ok\n"
        assert time.monotonic() - started < HANG_TIMEOUT / 2
        line = await asyncio.wait_for(hung_reader.readline(), TIMEOUT)
        assert line.startswith(b"ERR HandlerTimeout")
        assert server.stats.pool_restarts == 1  # the hung line timed out once, alone


@pytest.mark.asyncio
async def test_a_late_task_gives_back_the_other_connections_messages_done_or_not() -> None:
    """Three connections share a task, the second one's message hangs: the first one's
    message is done, the third one's not started.  Both are given back and run again on
    the free worker; each is delivered and counted once."""
    stats = Stats()
    pool = Pool(T + "hang", size=2, timeout=HANG_TIMEOUT, stats=stats)
    await pool.start()
    try:
        log: list[int] = []
        before, hung, after = (Submitter(i, 1, log) for i in range(3))
        pool.submit_one(b"before", before.deliver, None)
        pool.submit_one(b"hang", hung.deliver, None)
        pool.submit_one(b"after", after.deliver, None)
        both = asyncio.gather(before.complete, after.complete)
        await asyncio.wait_for(both, HANG_TIMEOUT / 2)
        assert before.calls == [[b"before"]] and after.calls == [[b"after"]]
        await asyncio.wait_for(hung.complete, TIMEOUT)
        [[timed_out]] = hung.calls
        assert type(timed_out).__name__ == "HandlerTimeout"
        assert log == [0, 2, 1]
        assert stats.pool_restarts == 1
        assert stats.messages == 3
        assert stats.offload_latency.count == 2  # the answered ones, once each
    finally:
        await pool.close(0)


@pytest.mark.asyncio
async def test_a_task_queued_behind_a_late_one_goes_to_the_free_worker() -> None:
    """Messages costing 1 ms, a task each: of three sent at once, the first hangs on one
    worker, the second goes to the other, the third is queued behind the first.  Once
    the first is late, the third is taken back and run by the free worker."""
    pool = Pool(T + "costly_hang", size=2, timeout=HANG_TIMEOUT, stats=Stats())
    await pool.start()
    try:
        log: list[int] = []
        warm = Submitter(9, 1, log)
        pool.submit_one(b"warm", warm.deliver, None)  # the cost is measured
        await asyncio.wait_for(warm.complete, TIMEOUT)
        hung, second, third = (Submitter(i, 1, log) for i in range(3))
        pool.submit_one(b"hang", hung.deliver, None)
        pool.submit_one(b"second", second.deliver, None)
        pool.submit_one(b"third", third.deliver, None)
        both = asyncio.gather(second.complete, third.complete)
        await asyncio.wait_for(both, HANG_TIMEOUT / 2)
        assert second.calls == [[b"second"]] and third.calls == [[b"third"]]
        await asyncio.wait_for(hung.complete, TIMEOUT)
        assert log == [9, 1, 2, 0]
        assert pool.stats.pool_restarts == 1
        assert pool.stats.messages == 4
    finally:
        await pool.close(0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fatal", "error"),
    [
        (b"fatal", b"ERR WorkerDied: worker process died while handling this message\n"),
        (b"hang", b"ERR HandlerTimeout: handler ran longer than --handler-timeout 2s\n"),
    ],
)
async def test_a_late_worker_that_dies_on_a_message_it_gave_back_blames_that_message(
    fatal: bytes, error: bytes
) -> None:
    """Two workers.  One peer's line naps, another's kills or hangs its worker; read in
    the same loop iteration, they share a task.  Once it is late, its worker keeps the
    nap and gives the other line back; the free worker dies or hangs on it, and so does
    the late one once its nap is done, since it was sent that line too.  Only the guilty
    peer gets an error; the napping one, which did nothing wrong, gets its echo."""
    async with (
        running_server(
            offload=Offload.process,
            pool_size=2,
            framing=Framing.line,
            handler=T + "nap_or_fatal",
            handler_timeout=HANG_TIMEOUT,
        ) as server,
        served_peers(server.port, 2) as peers,
    ):
        (napper_reader, napper), (guilty_reader, guilty) = peers
        started = time.monotonic()
        napper.write(b"nap\n")
        guilty.write(fatal + b"\n")  # no await between: one task, the nap first
        assert await asyncio.wait_for(guilty_reader.readline(), TIMEOUT) == error
        assert await asyncio.wait_for(napper_reader.readline(), TIMEOUT) == b"nap\n"
        # The nap ran twice: the late worker kept it, then met the guilty line.
        assert time.monotonic() - started >= 0.6
        assert server.stats.pool_restarts == 2  # both workers, on the guilty line
        assert server.stats.handler_errors == 1
        napper.write(b"after\n")
        assert await asyncio.wait_for(napper_reader.readline(), TIMEOUT) == b"after\n"


def test_what_a_late_task_gives_back_leaves_it_and_goes_nowhere_if_it_returns() -> None:
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    task = _queue((a, 2), (b, 1), (a, 1), (c, 2))
    back = give_back(task, running=2)  # b's message: b stays, the others go
    assert back is not None and back.messages == [b"a0", b"a1", b"a0", b"c0", b"c1"]
    assert back.entries[::3] == [a.done, a.done, c.done]
    assert task.entries[::3] == [discard, b.done, discard, discard]
    assert task.dropped == 5 and len(task.messages) == 6  # as the worker will answer
    assert task.messages == [b"", b"", b"b0", b"", b"", b""]  # the bytes held once
    assert task.kept().messages == [b"b0"]
    booked = Booked()
    task.waited(3.0, booked)
    assert sum(n for _, n in booked.calls) == 1  # only what is delivered from here
    assert give_back(task, running=2) is None  # nothing more to give
    # A task its worker has not started gives back everything not given back yet.
    assert give_back(task) is not None and task.kept().messages == []


class OnMessage:
    """A worker as :func:`blame` sees it: the index of the message it is on (None: unknown)."""

    def __init__(self, index: int | None) -> None:
        self.index = index

    def running(self) -> int | None:
        return self.index


def test_a_worker_lost_on_a_message_it_gave_back_blames_nothing_it_kept() -> None:
    a, b = Owner("a"), Owner("b")
    hung = WorkerDied("died")

    def late_task() -> deque[Task]:
        task = _queue((a, 1), (b, 1))
        give_back(task, running=0)  # a stays, b goes
        return deque([task, _queue((b, 2))])

    worker = cast(Worker, OnMessage(1))  # on b's message: a's runs again
    culprit, innocent = blame(tasks := late_task(), hung, worker)
    assert culprit is None and not tasks
    assert [_owners(t) for t in innocent] == [["a"], ["b", "b"]]
    for index in (0, None):  # on a's message, or not known: a's is to blame
        culprit, innocent = blame(late_task(), hung, cast(Worker, OnMessage(index)))
        assert culprit is not None and _owners(culprit) == ["a"]
        assert [_owners(t) for t in innocent] == [["b", "b"]]
    culprit, innocent = blame(late_task(), None, worker)  # between tasks: nothing running
    assert culprit is None and [_owners(t) for t in innocent] == [["a"], ["b", "b"]]


def test_a_task_put_back_goes_ahead_of_what_its_connections_have_waiting() -> None:
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    turns = Turns()
    turns.add(_queue((a, 2), (b, 2)))
    back = _queue((c, 1), (a, 1))  # a task sent out before, its worker gone
    back.messages = [b"c-back", b"a-back"]
    turns.put_back(back)
    assert list(turns.order) == [c, a, b]
    assert turns.take(10).messages == [b"c-back", b"a-back", b"a0", b"a1", b"b0", b"b1"]


class Booked:
    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def observe(self, seconds: float, n: int = 1) -> None:
        self.calls.append((seconds, n))


def test_each_message_is_booked_at_its_own_age() -> None:
    """A task shared among connections mixes old messages and new: each submission's
    messages are booked from when they were queued, not all from the oldest."""
    old, new = Owner("o"), Owner("n")
    turns = Turns()
    flood = _queue((old, 100))
    flood.queued_at = 10.0
    turns.add(flood)
    probe = _queue((new, 1))
    probe.queued_at = 19.5
    turns.add(probe)
    task = turns.take(4)
    booked = Booked()
    task.waited(20.0, booked)
    assert booked.calls == [(10.0, 2), (0.5, 1), (10.0, 1)]  # shares of 2, in turns


def test_turns_are_taken_when_the_queue_holds_more_than_fifty_milliseconds_of_work() -> None:
    def turns(queued: int, capacity: int, cost: float, taking: bool = False) -> bool:
        return batching.take_turns(queued, capacity, cost, taking)

    assert not turns(queued=10, capacity=20, cost=1e-3)  # all taken now
    assert not turns(queued=40, capacity=20, cost=1e-3)  # 40 ms: soon done
    assert turns(queued=60, capacity=20, cost=1e-3)
    assert not turns(queued=40_000, capacity=2048, cost=1e-6)  # echo: 40 ms
    assert turns(queued=60, capacity=20, cost=0.0)  # cost not known yet
    # Once taking turns, until under 25 ms of work.
    assert turns(queued=30, capacity=20, cost=1e-3, taking=True)
    assert not turns(queued=20, capacity=20, cost=1e-3, taking=True)
    assert not turns(queued=8000, capacity=2048, cost=1e-6, taking=True)  # measured: echo


def test_a_task_carries_about_twenty_milliseconds_of_work() -> None:
    assert batching.max_task(0.0) == batching.UNMEASURED_TASK  # a flood's first tasks too
    assert batching.max_task(1e-6) == batching.MAX_BATCH  # echo
    assert batching.max_task(1e-3) == 20  # burn
    assert batching.max_task(1.0) == 1


@pytest.mark.asyncio
async def test_a_peer_is_answered_while_another_floods_a_costly_handler() -> None:
    """One peer pipelines 3,000 lines to a handler costing 1 ms each (one worker: three
    seconds of work).  Another peer's line, sent once the flood is under way, is answered
    within a few tasks' worth of the flood's replies, not behind the flood's window of
    about a thousand lines."""
    async with running_server(
        offload=Offload.process, pool_size=1, framing=Framing.line, handler="burn"
    ) as server:
        behind, _ = await _probe_behind_a_flood(server, flooders=1, under_way_at=50)
        # First come, first served: 500 or more.  Shared: a few 20-line tasks.
        assert behind < 200, behind


@pytest.mark.asyncio
async def test_a_peer_is_answered_while_others_fill_the_pools_budget() -> None:
    """Four peers flood a 1 ms handler with 2-byte lines, enough to fill a 64 KiB budget
    and queue for room.  Another peer's line, sent once the flood is under way, is
    answered within a few tasks, not after the flood."""
    async with running_server(
        offload=Offload.process,
        pool_size=1,
        framing=Framing.line,
        handler="burn",
        pool_budget=64 * 1024,
        pool_window=32 * 1024,
    ) as server:
        behind, waiting = await _probe_behind_a_flood(server, flooders=4, under_way_at=100)
        assert waiting > 0  # the budget is full, peers queue for room
        assert behind < 300, behind  # the flood owes 11,900 more
