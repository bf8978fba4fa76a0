"""The socket between the pool and a worker: a worker that hangs up, writes garbage,
miscounts, or leaves a result half written fails only its own batch and is replaced;
one that dies before it is ready is a start-up error; batches and results larger than
the socket's buffer cross whole; and the frames themselves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from aecho.config import Framing, Offload
from aecho.offload import wire, worker
from aecho.offload.outcomes import Outcome
from aecho.offload.pool import Pool
from aecho.server.stats import Stats
from tests.conftest import alive, running_server, wait_until

ROOT = Path(__file__).resolve().parent.parent
FAULTY = "tests.handlers_for_tests:faulty"
TIMEOUT = 60.0
DIED = b"ERR WorkerDied: worker process died while handling this message\n"
MALFORMED = b"ERR WorkerDied: worker process sent a malformed frame: "


async def _line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), TIMEOUT)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"hangup", DIED),
        (b"garbage", MALFORMED + b"unexpected frame kind 103\n"),
        (b"miscount", MALFORMED + b"2 replies to 1 messages\n"),
        (b"partial exit", DIED),
    ],
)
async def test_a_worker_that_breaks_its_socket_fails_its_batch_and_is_replaced(
    command: bytes, reply: bytes
) -> None:
    async with running_server(
        offload=Offload.process, pool_size=1, framing=Framing.line, handler=FAULTY
    ) as server:
        pool = server.pool
        assert isinstance(pool, Pool)
        [old] = pool.pids
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"before\n")
        assert await _line(reader) == b"before\n"
        writer.write(command + b"\n")
        assert await _line(reader) == reply
        writer.write(b"after\n")
        assert await _line(reader) == b"after\n"
        assert server.stats.pool_restarts == 1
        assert server.stats.handler_errors == 1
        assert pool.pids and old not in pool.pids
        assert await asyncio.to_thread(wait_until, lambda: not alive(old), 30.0)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_result_left_half_written_is_a_handler_timeout() -> None:
    async with running_server(
        offload=Offload.process,
        pool_size=1,
        framing=Framing.line,
        handler=FAULTY,
        handler_timeout=0.5,
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"partial hang\n")
        assert await _line(reader) == (
            b"ERR HandlerTimeout: handler ran longer than --handler-timeout 0.5s\n"
        )
        writer.write(b"after\n")
        assert await _line(reader) == b"after\n"
        assert server.stats.pool_restarts == 1
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def test_a_worker_that_dies_before_it_is_ready_is_a_one_line_start_up_error(
    tmp_path: Path,
) -> None:
    # The server resolves the handler too: the module dies only in a pool worker.
    (tmp_path / "dying_mod.py").write_text(
        "import multiprocessing, os\n\n"
        "if multiprocessing.parent_process() is not None:\n"
        "    os._exit(3)\n\n\n"
        "def f(data):\n"
        "    return data\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--port", "0", "--offload", "process",
         "--pool-size", "2", "--handler", "dying_mod:f"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aecho: error: cannot start worker processes: worker ")
    assert lines[0].endswith(" closed its socket")


@pytest.mark.asyncio
async def test_batches_and_results_larger_than_the_socket_buffer_cross_whole() -> None:
    # Raw chunks of up to a read each, four peers at once: batches of several hundred
    # KiB, past what a Unix socket buffers, so sends and reads both come in pieces.
    async with running_server(offload=Offload.process, pool_size=2, handler="reverse") as server:

        async def one(seed: int) -> None:
            payload = random.Random(seed).randbytes(3 << 20)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            got = bytearray()

            async def read_all() -> None:
                while len(got) < len(payload):
                    chunk = await asyncio.wait_for(reader.read(1 << 20), TIMEOUT)
                    assert chunk
                    got.extend(chunk)

            reading = asyncio.create_task(read_all())
            writer.write(payload)
            await writer.drain()
            await reading
            writer.close()
            # Each read was reversed on its own: the lengths match, the bytes as a whole
            # are the payload's, chunk by chunk.
            assert len(got) == len(payload)
            assert sorted(got) == sorted(payload)

        await asyncio.gather(*(one(seed) for seed in range(4)))
        assert server.stats.pool_restarts == 0


# -- frames ----------------------------------------------------------------------------------


def _parse(frame: bytes) -> tuple[list[bytes], wire.Failures | None]:
    kind, count, blob, extra, _seconds = wire.FRAME.unpack_from(frame)
    assert kind == wire.RESULT
    assert wire.frame_size(count, blob, extra) == len(frame)
    return wire.parse(frame, wire.FRAME.size, count, blob, extra)


def test_a_worker_writes_which_message_of_which_batch_it_runs() -> None:
    progress = memoryview(bytearray(wire.PROGRESS.size)).cast("I")
    seen: list[tuple[int, ...]] = []

    def handler(data: bytes) -> bytes:
        seen.append(wire.PROGRESS.unpack(progress))
        return data

    replies, failures, _ = worker.run_batch(handler, [b"a", b"b", b"c"], progress, 7)
    assert replies == [b"a", b"b", b"c"] and not failures
    assert seen == [(0, 7), (1, 7), (2, 7)]  # index, batch number


def test_a_result_frame_round_trips() -> None:
    replies = [b"", b"a", b"\x00" * 1000, b"last"]
    failed = {1: ("ValueError", "no \u00e9", "Traceback ...")}
    assert _parse(wire.result(replies, failed, 0.5)) == (replies, failed)
    assert _parse(wire.result(replies, {}, 0.5)) == (replies, None)


def test_a_batch_frame_splits_back_into_its_messages() -> None:
    messages = [b"x" * n for n in (0, 1, 64, 70000)]
    frame = wire.batch(messages)
    count, blob = wire.BATCH.unpack_from(frame)
    assert (count, blob) == (4, 70065)
    assert wire.split(frame, wire.BATCH.size, count, blob) == messages


def test_lengths_that_do_not_add_up_are_malformed() -> None:
    frame = wire.batch([b"abc", b"de"])
    with pytest.raises(wire.Malformed, match="add up to 5 bytes, not 6"):
        wire.split(frame, wire.BATCH.size, 2, 6)


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"a": 1}', b"[[0, 1]]", b'[[5, "E", "t", ""]]', b'[["0", "E", "t", ""]]'],
)
def test_failures_that_are_not_what_a_worker_writes_are_malformed(raw: bytes) -> None:
    with pytest.raises(wire.Malformed):
        wire.failures(raw, 2)


@pytest.mark.asyncio
async def test_a_worker_that_dies_with_a_batch_unread_fails_its_own_at_once() -> None:
    """docs/architecture.md: "A worker that ... exits mid-frame fails its running batch
    with ``WorkerDied`` ... and is replaced".

    A worker that exits with a batch still unread in its socket resets the pool's end.
    When the loop gets to the socket only then (a busy loop, here a loop that stops
    watching it until the worker is gone), more than one read of result is waiting with
    the reset; all of it and the end must be read at once: uvloop reports a reset to the
    reader once and stops watching the socket, and the batch would wait out
    ``--handler-timeout`` instead.
    """
    pool = Pool(FAULTY, size=1, timeout=20, stats=Stats())
    await pool.start()
    loop = asyncio.get_running_loop()
    first: asyncio.Future[list[Outcome]] = loop.create_future()
    rest: asyncio.Future[list[Outcome]] = loop.create_future()
    try:
        [slot] = pool._slots
        link = slot.worker
        assert link is not None
        fatal = b"partial exit slowly " + b"x" * 300_000
        pool.submit_one(fatal, lambda _t, o, s, e: first.set_result(o[s:e]), 0)
        deadline = loop.time() + TIMEOUT
        while not slot.tasks:
            assert loop.time() < deadline, "the batch was never sent"
            await asyncio.sleep(0.01)
        # Enough for a task of its own: sent at once, behind the running one.
        messages = [b"m%d" % i for i in range(600)]
        pool.submit_to(messages, lambda _t, o, s, e: rest.set_result(o[s:e]), 1)
        while len(slot.tasks) < 2:
            assert loop.time() < deadline, "the second batch was never sent"
            await asyncio.sleep(0.01)
        fd = link._fd
        loop.remove_reader(fd)
        started = loop.time()
        while link.alive:
            assert loop.time() < deadline, "the worker never exited"
            await asyncio.sleep(0.01)
        loop.add_reader(fd, link._readable)
        [died] = await asyncio.wait_for(first, TIMEOUT)
        assert type(died).__name__ == "WorkerDied"
        assert loop.time() - started < 10
        assert await asyncio.wait_for(rest, TIMEOUT) == messages
        assert pool.stats.pool_restarts == 1
    finally:
        await pool.close(0)
