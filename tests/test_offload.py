"""Process-pool offload: identical replies, ordering, handler faults, worker crashes and
timeouts, start-up errors, worker titles, and no orphans after the server is SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aecho.cli import app
from aecho.config import Framing, Offload
from aecho.offload.handlers import BUILTINS
from aecho.offload.outcomes import Outcome
from aecho.offload.pool import Pool
from aecho.server.stats import Stats
from tests.conftest import alive, cmdline, descendants, running_server, until, wait_until

ROOT = Path(__file__).resolve().parent.parent
T = "tests.handlers_for_tests:"
TIMEOUT = 60.0


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


def _messages(seed: int, count: int, line: bool) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        size = rng.choice([0, 1, 2, 7, 64, 255, 1000]) if line else rng.randint(1, 1000)
        data = rng.randbytes(size)
        if line:
            data = data.replace(b"\n", b"N")
        if rng.random() < 0.3:
            data = b"mixed Case text \x00\xff " + data
        out.append(data)
    return out


async def _exchange(
    port: int, framing: Framing, messages: list[bytes], handler_name: str
) -> list[bytes]:
    handler = BUILTINS[handler_name]
    reader, writer = await _open(port)
    replies = []
    try:
        if framing is Framing.line:
            # Pipelined: every message in flight at once, replies must come back in order.
            writer.write(b"".join(m + b"\n" for m in messages))
            for _ in messages:
                replies.append(await asyncio.wait_for(reader.readline(), TIMEOUT))
        else:
            # Raw framing hands the handler each chunk as read: one message at a time.
            for m in messages:
                writer.write(m)
                replies.append(await asyncio.wait_for(reader.readexactly(len(handler(m))), TIMEOUT))
    finally:
        await _close(writer)
    return replies


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", [Framing.raw, Framing.line])
async def test_inline_and_process_give_identical_replies(framing: Framing) -> None:
    for seed, name in enumerate(BUILTINS):
        messages = _messages(seed, 25 if name == "burn" else 60, framing is Framing.line)
        suffix = b"\n" if framing is Framing.line else b""
        expected = [BUILTINS[name](m) + suffix for m in messages]
        for offload in (Offload.inline, Offload.process):
            async with running_server(
                offload=offload, pool_size=2, handler=name, framing=framing
            ) as server:
                got = await _exchange(server.port, framing, messages, name)
            assert got == expected, (name, offload)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("framing", "per_write", "connections"), [(Framing.line, 8, 200), (Framing.raw, 1, 50)]
)
async def test_order_holds_with_64_pipelined_messages(
    framing: Framing, per_write: int, connections: int
) -> None:
    async with running_server(
        offload=Offload.process, pool_size=2, framing=framing, handler=T + "jitter"
    ) as server:
        shape = b"c%d-m%d\n" if framing is Framing.line else b"<c%d-m%d>"

        async def one(c: int) -> tuple[bytes, bytes]:
            reader, writer = await _open(server.port)
            messages = [shape % (c, i) for i in range(64)]
            # Writes of a few messages (raw: one chunk, so each is its own read) with a
            # yield between them, so one connection's messages travel in several
            # batches that can finish out of order.
            for k in range(0, 64, per_write):
                writer.write(b"".join(messages[k : k + per_write]))
                await writer.drain()
                await asyncio.sleep(0)
            expected = b"".join(messages)
            got = await asyncio.wait_for(reader.readexactly(len(expected)), TIMEOUT)
            await _close(writer)
            return got, expected

        for got, expected in await asyncio.gather(*(one(c) for c in range(connections))):
            assert got == expected
        stats = server.stats
        assert stats.offload_latency.count == stats.messages  # each counted once, by the pool
        if framing is Framing.line:
            assert stats.messages == connections * 64
        assert stats.pool_restarts == 0
        assert stats.handler_errors == 0


@pytest.mark.asyncio
async def test_a_stalled_worker_does_not_hold_up_the_others(tmp_path: Path) -> None:
    async with running_server(
        offload=Offload.process, pool_size=2, framing=Framing.line, handler=T + "stall"
    ) as server:
        pidfile = tmp_path / "stalled.pid"
        victim_r, victim_w = await _open(server.port)
        victim_w.write(b"stall %s\n" % str(pidfile).encode())
        await until(pidfile.exists, "the stalled worker's pid")
        # Small batches wait for a running task to come back, but not for one that
        # is overdue: the idle worker serves everyone else meanwhile.
        reader, writer = await _open(server.port)
        for i in range(20):
            started = time.monotonic()
            writer.write(b"m%d\n" % i)
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"m%d\n" % i
            assert time.monotonic() - started < 2.0
        await _close(writer)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert (await asyncio.wait_for(victim_r.readline(), TIMEOUT)).startswith(b"ERR WorkerDied")
        await _close(victim_w)


@pytest.mark.asyncio
@pytest.mark.parametrize("offload", [Offload.inline, Offload.process])
@pytest.mark.parametrize(
    ("handler", "bad", "err"),
    [
        ("boom", b"boom1", b"ERR ValueError: refused b'boom1'\n"),
        # An exception whose str() raises in turn must not take its worker down (that
        # would fail the whole read with ERR WorkerDied and cost a restart), nor the
        # inline connection that reports it.
        ("unprintable", b"unprintable", b"ERR _Unprintable: <exception str() failed>\n"),
        # A handler cannot end the server, nor its worker, by asking its program to end.
        ("exits", b"exit now", b"ERR SystemExit: 2\n"),
        ("interrupts", b"kbint", b"ERR KeyboardInterrupt: \n"),
        ("gives_str", b"str", b"ERR TypeError: handler returned str, not bytes\n"),
    ],
    ids=["raises", "unprintable", "exits", "interrupts", "not-bytes"],
)
async def test_raising_handler_line_framing_replies_err(
    offload: Offload, handler: str, bad: bytes, err: bytes
) -> None:
    """README, Offload, Faults: "A handler that raises costs that message an
    ``ERR <ExceptionName>: <message>`` line (line framing) ...; it is logged and the server
    carries on."
    """
    async with running_server(
        offload=offload, pool_size=1, framing=Framing.line, handler=T + handler
    ) as server:
        reader, writer = await _open(server.port)
        writer.write(b"a\n" + bad + b"\nb\n")
        got = [await asyncio.wait_for(reader.readline(), TIMEOUT) for _ in range(3)]
        assert got == [b"a\n", err, b"b\n"]
        assert server.stats.handler_errors == 1
        assert server.stats.pool_restarts == 0
        await _close(writer)


@pytest.mark.asyncio
@pytest.mark.parametrize("offload", [Offload.inline, Offload.process])
@pytest.mark.parametrize(
    ("handler", "bad"),
    [("boom", b"boom!"), ("exits", b"exit"), ("interrupts", b"kbint"), ("gives_str", b"str")],
)
async def test_raising_handler_raw_framing_closes_connection(
    offload: Offload, handler: str, bad: bytes
) -> None:
    async with running_server(
        offload=offload, pool_size=1, framing=Framing.raw, handler=T + handler
    ) as server:
        reader, writer = await _open(server.port)
        writer.write(bad)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        assert server.stats.handler_errors == 1  # counted as the handler's failure
        assert server.stats.pool_restarts == 0
        await _close(writer)
        reader, writer = await _open(server.port)  # the server carries on
        writer.write(b"fine")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"fine"
        await _close(writer)


@pytest.mark.asyncio
async def test_worker_sigkilled_mid_load(tmp_path: Path) -> None:
    async with running_server(
        offload=Offload.process, pool_size=2, framing=Framing.line, handler=T + "stall"
    ) as server:
        pool = server.pool
        assert isinstance(pool, Pool)
        before = set(pool.pids)
        pidfile = tmp_path / "stalled.pid"
        victim_r, victim_w = await _open(server.port)
        victim_w.write(b"stall %s\n" % str(pidfile).encode())
        await until(pidfile.exists, "the stalled worker's pid")  # its batch is running
        victim = int(pidfile.read_text())
        assert victim in before

        done = [0] * 20
        killed = asyncio.Event()

        async def traffic(c: int) -> None:
            reader, writer = await _open(server.port)
            n = 0
            # Keep going until 20 round trips after the kill.
            while not killed.is_set() or done[c] < 20:
                msg = b"t%d-%d\n" % (c, n)
                writer.write(msg)
                assert await asyncio.wait_for(reader.readline(), TIMEOUT) == msg
                n += 1
                if killed.is_set():
                    done[c] += 1
            await _close(writer)

        tasks = [asyncio.create_task(traffic(c)) for c in range(20)]
        await until(lambda: server.stats.messages >= 200, "traffic")
        os.kill(victim, signal.SIGKILL)
        killed.set()
        line = await asyncio.wait_for(victim_r.readline(), TIMEOUT)
        assert line == b"ERR WorkerDied: worker process died while handling this message\n"
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        assert server.stats.pool_restarts == 1
        assert server.stats.handler_errors == 1
        victim_w.write(b"after\n")
        assert await asyncio.wait_for(victim_r.readline(), TIMEOUT) == b"after\n"
        await _close(victim_w)
        await until(lambda: len(pool.pids) == 2, "the replacement worker")
        assert victim not in pool.pids


@pytest.mark.asyncio
async def test_handler_timeout_fails_the_batch_and_replaces_the_worker() -> None:
    async with running_server(
        offload=Offload.process,
        pool_size=1,
        framing=Framing.line,
        handler=T + "hang",
        handler_timeout=0.5,
    ) as server:
        pool = server.pool
        assert isinstance(pool, Pool)
        [old] = pool.pids
        reader, writer = await _open(server.port)
        started = time.monotonic()
        writer.write(b"hang\n")
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert line == b"ERR HandlerTimeout: handler ran longer than --handler-timeout 0.5s\n"
        assert time.monotonic() - started >= 0.5
        writer.write(b"ok\n")
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"ok\n"
        assert server.stats.pool_restarts == 1
        assert pool.pids and old not in pool.pids
        assert await asyncio.to_thread(wait_until, lambda: not alive(old), 30.0)
        await _close(writer)


@pytest.mark.asyncio
async def test_graceful_stop_waits_for_running_batches() -> None:
    async with running_server(
        offload=Offload.process, pool_size=1, framing=Framing.line, handler=T + "nap"
    ) as server:
        pool = server.pool
        assert isinstance(pool, Pool)
        pids = pool.pids
        reader, writer = await _open(server.port)
        writer.write(b"late\n")
        await until(lambda: pool.running, "the batch to be running")
        stop = asyncio.create_task(server.shutdown())
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"late\n"
        await asyncio.wait_for(stop, TIMEOUT)
        await _close(writer)
        assert await asyncio.to_thread(wait_until, lambda: not any(map(alive, pids)), 30.0)


@pytest.mark.asyncio
async def test_workers_carry_the_process_title() -> None:
    async with running_server(offload=Offload.process, pool_size=2) as server:
        pool = server.pool
        assert isinstance(pool, Pool)
        assert len(pool.pids) == 2
        for pid in pool.pids:
            assert cmdline(pid).startswith(b"aecho: pool worker")


BAD_HANDLERS = [
    ("nosuch", "unknown handler 'nosuch'"),
    ("no_such_module_xyz:f", "cannot import handler module 'no_such_module_xyz'"),
    ("os:no_such_function", "module 'os' has no 'no_such_function'"),
    (T + "not_callable", "is not callable"),
]


@pytest.mark.parametrize("offload", ["inline", "process"])
@pytest.mark.parametrize(("name", "message"), BAD_HANDLERS)
def test_bad_handler_is_one_line_and_exit_1(offload: str, name: str, message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aecho",
            "serve",
            "--port",
            "0",
            "--offload",
            offload,
            "--handler",
            name,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aecho: error: ") and message in lines[0]


def test_handler_timeout_must_be_positive() -> None:
    result = CliRunner().invoke(app, ["serve", "--handler-timeout", "0"])
    assert result.exit_code == 2
    assert "--handler-timeout must be a positive number" in result.output


def test_no_orphan_workers_after_server_sigkill(serve_process) -> None:  # type: ignore[no-untyped-def]
    srv = serve_process("--offload", "process", "--pool-size", "2", env={"PYTHONPATH": str(ROOT)})
    family = descendants(srv.pid)
    workers = [pid for pid in family if cmdline(pid).startswith(b"aecho: pool worker")]
    assert len(workers) == 2, family
    srv.kill()  # SIGKILL: no chance to clean up
    assert wait_until(lambda: not any(alive(pid) for pid in family), 20.0), [
        pid for pid in family if alive(pid)
    ]


@pytest.mark.asyncio
async def test_half_close_flushes_pooled_replies_then_closes() -> None:
    async with running_server(
        offload=Offload.process, pool_size=1, framing=Framing.line, handler=T + "nap"
    ) as server:
        reader, writer = await _open(server.port)
        writer.write(b"first\nlast without newline")
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
        assert got == b"first\nlast without newline\n"
        await _close(writer)


@pytest.mark.asyncio
async def test_pooled_line_too_long_answers_the_earlier_lines_first() -> None:
    async with running_server(
        offload=Offload.process, pool_size=1, framing=Framing.line, max_line=16, handler=T + "nap"
    ) as server:
        reader, writer = await _open(server.port)
        # Two good lines still in the pool when the third breaks the limit: their
        # replies come first, then the one error line, then the close.
        writer.write(b"first\nsecond\n" + b"x" * 40)
        got = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert got == b"first\nsecond\nERR line too long: limit is 16 bytes\n"
        await _close(writer)


async def _one(pool: Pool, message: bytes) -> list[Outcome]:
    again: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
    pool.submit_one(message, lambda _t, o, s, e: again.set_result(o[s:e]), None)
    return await asyncio.wait_for(again, TIMEOUT)


async def _one_batch_of_four(pool: Pool, fatal: bytes) -> list[list[Outcome]]:
    """Submit four connections' messages in one loop iteration (one flush: with one
    worker, one batch), the second submission being ``fatal``; their outcomes."""
    loop = asyncio.get_running_loop()
    got: dict[int, asyncio.Future[list[Outcome]]] = {i: loop.create_future() for i in range(4)}

    def done(token: int, outcomes: list[Outcome], start: int, stop: int) -> None:
        got[token].set_result(outcomes[start:stop])

    pool.submit_to([b"a0", b"b0"], done, 0)
    pool.submit_to([fatal], done, 1)
    pool.submit_one(b"c", done, 2)
    pool.submit_to([b"d0", b"d1", b"d2"], done, 3)
    return await asyncio.wait_for(asyncio.gather(*got.values()), TIMEOUT)


@pytest.mark.asyncio
async def test_a_message_that_kills_its_worker_fails_alone_in_a_batch_it_shared() -> None:
    """Submissions of several connections share a batch; one of them kills the worker.
    Only that submission fails: the others run again, each on its own."""
    pool = Pool(T + "crash", size=1, timeout=30, stats=Stats())
    await pool.start()
    try:
        results = await _one_batch_of_four(pool, b"crash")
        assert results[0] == [b"a0", b"b0"]
        [failed] = results[1]
        assert type(failed).__name__ == "WorkerDied"
        assert results[2:] == [[b"c"], [b"d0", b"d1", b"d2"]]
        assert pool.stats.pool_restarts == 2  # the batch's worker, then the fatal one's alone
        assert await _one(pool, b"after") == [b"after"]  # and the pool goes on
    finally:
        await pool.close(0)


@pytest.mark.asyncio
async def test_a_batch_that_hangs_fails_whole_and_the_pool_goes_on() -> None:
    """A hung batch of one connection's submissions (one callback's, as the pool sees it)
    is not split: each would wait out the timeout in turn, with everything queued behind
    them.  Every message of it gets HandlerTimeout."""
    pool = Pool(T + "hang", size=1, timeout=0.5, stats=Stats())
    await pool.start()
    try:
        results = await _one_batch_of_four(pool, b"hang")
        assert [type(o).__name__ for r in results for o in r] == ["HandlerTimeout"] * 7
        assert pool.stats.pool_restarts == 1
        assert await _one(pool, b"after") == [b"after"]
    finally:
        await pool.close(0)


@pytest.mark.asyncio
async def test_a_replacement_slower_to_start_than_the_timeout_still_serves(
    tmp_path: Path,
) -> None:
    """README, Offload, Faults: "A batch running longer than ``--handler-timeout`` ... has
    its worker killed and replaced".

    A replacement that takes longer than the timeout to import its handler has not run
    the batches sent to it meanwhile: they must not time out (and kill it, and the next
    one, for as long as traffic comes).
    """
    (tmp_path / "slow_start.py").write_text(
        "import multiprocessing, time\n\n"
        "if multiprocessing.parent_process() is not None:\n"
        "    time.sleep(1.0)\n\n\n"
        "def hang(data):\n"
        "    if data == b'hang':\n"
        "        time.sleep(60)\n"
        "    return data\n"
    )
    pool = Pool("slow_start:hang", size=1, timeout=0.5, stats=Stats(), directory=str(tmp_path))
    await pool.start()
    try:
        [timed_out] = await _one(pool, b"hang")
        assert type(timed_out).__name__ == "HandlerTimeout"
        assert await _one(pool, b"after") == [b"after"]
        assert await _one(pool, b"again") == [b"again"]
        assert pool.stats.pool_restarts == 1
    finally:
        await pool.close(0)
