"""Peers that send and never read, in every mode: server memory stays bounded and the loop
keeps answering others (README "Behaviour under stress")."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import pytest

from aecho.config import MESSAGE_COST
from aecho.offload.handlers import BUILTINS
from aecho.server.budget import READ_ESTIMATE, Budget
from aecho.server.connection import PAUSE_WRITE, FramedConnection
from aecho.server.pooled import PooledConnection
from tests.conftest import ServerProcess, flood, running_server

KiB = 1024
# Lines of 1 KiB, packed into 64 KiB sends.
LINES = (b"l" * (KiB - 1) + b"\n") * 64

MODES: dict[str, tuple[list[str], bytes, bytes, bytes]] = {
    # name: (serve options, what the flooders send, the probe, its reply)
    "raw-inline": ([], b"r" * 64 * KiB, b"probe", b"probe"),
    "line-inline": (["--framing", "line"], LINES, b"probe\n", b"probe\n"),
    "raw-process": (
        ["--offload", "process", "--pool-size", "2"], b"r" * 64 * KiB, b"probe", b"probe",
    ),
    "line-process": (
        ["--offload", "process", "--pool-size", "2", "--framing", "line"],
        LINES, b"probe\n", b"probe\n",
    ),
    # Two-byte lines, 65-byte replies: the replies outgrow the input 30 times over.
    "sha256-line-inline": (
        ["--framing", "line", "--handler", "sha256"],
        b"a\n" * 32 * KiB, b"p\n", hashlib.sha256(b"p").hexdigest().encode() + b"\n",
    ),
    "sha256-line-process": (
        ["--offload", "process", "--pool-size", "2", "--framing", "line", "--handler", "sha256"],
        b"a\n" * 32 * KiB, b"p\n", hashlib.sha256(b"p").hexdigest().encode() + b"\n",
    ),
    # Smaller sends: each read holds fewer lines than a window, so the backlog, not the
    # window, is what must wait while the write buffer is above its mark.
    "sha256-line-process-16k": (
        ["--offload", "process", "--pool-size", "2", "--framing", "line", "--handler", "sha256"],
        b"a\n" * 8 * KiB, b"p\n", hashlib.sha256(b"p").hexdigest().encode() + b"\n",
    ),
}  # fmt: skip

# The README promises < 64 MiB for 10 s (benchmarks/memory_bound.py); a shorter flood
# must stay well inside it.
GROWTH_LIMIT_MIB = 64
PROBE_P99_LIMIT_MS = 100


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILTINS))
def test_every_built_in_reply_fits_in_its_message_and_its_cost(name: str) -> None:
    """The bounds count bytes read, plus MESSAGE_COST a message: they hold only while no
    reply is larger than that, as README.md says of every built-in handler."""
    handler = BUILTINS[name]
    for message in (b"", b"a", b"ab" * 3, bytes(range(256)) * 4, b"x" * 256 * 1024):
        assert len(handler(message)) <= len(message) + MESSAGE_COST, (name, len(message))


@pytest.mark.parametrize("mode", list(MODES))
def test_peers_that_never_read_keep_memory_bounded_and_the_loop_responsive(
    serve_process: Callable[..., ServerProcess], mode: str
) -> None:
    options, chunk, probe, reply = MODES[mode]
    server = serve_process(*options)
    result = flood(server.pid, server.port, chunk, probe, reply, seconds=4.0)
    assert result.sent > 4 * 1024 * KiB, "the server never read"
    assert result.probe_failures == 0
    assert result.growth_mib < GROWTH_LIMIT_MIB, (
        f"{mode}: server RSS grew {result.growth_mib:.0f} MiB "
        f"after {result.sent / 1024 / KiB:.0f} MiB sent"
    )
    assert result.probe_p99_ms < PROBE_P99_LIMIT_MS, (
        f"{mode}: probe p99 {result.probe_p99_ms:.1f} ms"
    )
    assert server.stop() == 0


class _Waiter:
    def __init__(self, name: str, log: list[str], alive: bool = True) -> None:
        self.name, self.log, self.alive = name, log, alive

    def wake(self) -> bool:
        self.log.append(self.name)
        return self.alive


def test_budget_wakes_waiters_first_come_first_served_as_room_allows() -> None:
    budget = Budget(4 * READ_ESTIMATE)
    woken: list[str] = []
    budget.held = 4 * READ_ESTIMATE
    for name, alive in [("a", True), ("gone", False), ("b", True), ("c", True), ("d", True)]:
        budget.wait(_Waiter(name, woken, alive))
    budget.release(READ_ESTIMATE // 2)  # not room for one read yet
    assert woken == []
    budget.release(3 * READ_ESTIMATE // 2)  # room for two: a gone connection takes none
    assert woken == ["a", "gone", "b"]
    budget.release(2 * READ_ESTIMATE)  # all free: room for four
    assert woken == ["a", "gone", "b", "c", "d"]
    assert budget.held == 0 and budget.waiting == 0


def test_a_waiter_that_holds_nothing_is_woken_first_at_any_room() -> None:
    """Connections flooding the pool fill the budget and queue; a peer's first message
    stopped behind them is woken at the first room, not after each of them had a read."""
    budget = Budget(4 * READ_ESTIMATE)
    woken: list[str] = []
    budget.held = 4 * READ_ESTIMATE
    for name in ("a", "b"):
        budget.wait(_Waiter(name, woken))
    budget.wait(_Waiter("peer", woken), holding=False)
    assert budget.waiting == 3
    budget.release(1000)  # room for a message, not for a read
    assert woken == ["peer"]
    budget.release(READ_ESTIMATE)
    assert woken == ["peer", "a"]


@pytest.mark.parametrize("held", [0, 1000])
def test_a_connection_stopped_by_the_budget_says_whether_it_holds_anything(held: int) -> None:
    class Stopped:  # the state _hold_back reads and writes
        _held, _window, _paused = held, 256 * 1024, 0
        _budget = Budget(4 * READ_ESTIMATE)

        def _pause(self, reason: int) -> None:
            self._paused |= reason

    conn = Stopped()
    conn._budget.held = conn._budget.limit
    PooledConnection._hold_back(conn)  # type: ignore[arg-type]
    budget = conn._budget
    assert (len(budget.first), len(budget.waiters)) == ((0, 1) if held else (1, 0))


@pytest.mark.asyncio
async def test_a_small_pool_budget_serves_every_connection_and_holds_nothing_after() -> None:
    size = 1024 * KiB
    async with running_server(
        offload="process", pool_size=1, pool_budget=1024 * KiB, pool_window=256 * KiB
    ) as server:
        budget = server.budget
        peak = waited = 0

        async def exchange(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            payload = bytes([i]) * size
            writer.write(payload)
            got = await reader.readexactly(size)
            writer.close()
            await writer.wait_closed()
            return got

        tasks = [asyncio.create_task(exchange(i)) for i in range(20)]
        for _ in range(2000):
            if all(t.done() for t in tasks):
                break
            peak = max(peak, budget.held)
            waited = max(waited, budget.waiting)
            await asyncio.sleep(0.002)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert [r == bytes([i]) * size for i, r in enumerate(results)] == [True] * 20
        assert waited > 0, "the budget never held anyone back"
        # Past the limit by at most one read for each connection reading at that moment.
        assert peak <= budget.limit + 20 * (256 * KiB + MESSAGE_COST)
        for _ in range(200):
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        assert budget.held == 0 and budget.waiting == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("offload", ["inline", "process"])
async def test_replies_that_outgrow_a_read_all_arrive_in_order_before_the_close(
    offload: str,
) -> None:
    """A read of 100,000 tiny lines is handled in slices behind a backlog; a half-close
    right after it still gets every reply, in order, then EOF."""
    lines = [b"%d" % i for i in range(100_000)]
    expected = b"".join(hashlib.sha256(line).hexdigest().encode() + b"\n" for line in lines)
    async with running_server(framing="line", handler="sha256", offload=offload) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\n".join(lines) + b"\n")
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        await writer.wait_closed()
    assert len(got) == len(expected)
    assert got == expected


@pytest.mark.asyncio
@pytest.mark.parametrize("offload", ["inline", "process"])
async def test_a_peer_that_reads_late_still_gets_every_reply(offload: str) -> None:
    """Replies fill the write buffer past its mark while the peer is not reading, and the
    lines already read wait in the backlog; once the peer reads, the buffer drains and the
    backlog must be taken up again (pooled connections once stalled there for good)."""
    lines = [b"%d" % i for i in range(100_000)]
    expected = b"".join(hashlib.sha256(line).hexdigest().encode() + b"\n" for line in lines)
    async with running_server(framing="line", handler="sha256", offload=offload) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\n".join(lines) + b"\n")

        def held_by_the_write_buffer() -> bool:
            return any(
                isinstance(c, FramedConnection) and c._paused & PAUSE_WRITE and c._backlog
                for c in server.connections
            )

        for _ in range(3000):  # the peer reads nothing until the buffer is past its mark
            if held_by_the_write_buffer():
                break
            await asyncio.sleep(0.01)
        assert held_by_the_write_buffer()
        got = await asyncio.wait_for(reader.readexactly(len(expected)), 60)
        writer.close()
        await writer.wait_closed()
    assert got == expected
