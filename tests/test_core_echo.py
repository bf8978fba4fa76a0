"""The echo itself: exact bytes, any size, many connections, half-close and resets."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess, running_server

MiB = 1024 * 1024


def roundtrip(port: int, chunks: list[bytes], timeout: float = 60.0) -> bytes:
    """Send ``chunks`` from a thread while reading the echo; half-close at the end."""
    total = sum(map(len, chunks))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def send() -> None:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = bytearray()
        while data := sock.recv(256 * 1024):
            received += data
        sender.join(timeout)
        assert len(received) == total
        return bytes(received)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def echo_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    server = ServerProcess(["--port", "0", "--loop", request.param])
    yield server
    assert server.stop() == 0


sizes = st.one_of(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=300, max_value=70_000),
    st.sampled_from([64 * 1024, MiB, 3 * MiB + 17, 8 * MiB]),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(size=sizes, seed=st.integers(), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_payload_any_chunking_is_echoed_exactly(
    echo_server: ServerProcess, size: int, seed: int, cuts: list[int]
) -> None:
    rng = random.Random(seed)
    # Random bytes are full of NULs and invalid UTF-8; add both explicitly for small sizes.
    payload = rng.randbytes(size)
    if size >= 4:
        payload = b"\x00\xff\xfe\xc3" + payload[4:]
    points = sorted({c % (size + 1) for c in cuts} | {0, size})
    chunks = [payload[a:b] for a, b in itertools.pairwise(points)]
    assert roundtrip(echo_server.port, chunks) == payload


@pytest.mark.asyncio
async def test_a_thousand_concurrent_connections_each_get_their_own_bytes() -> None:
    async with running_server() as server:

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            payload = struct.pack("!I", i) * 256  # 1 KiB, unique per connection
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            writer.close()
            await writer.wait_closed()
            return echoed

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 120)
        for i, echoed in enumerate(results):
            assert echoed == struct.pack("!I", i) * 256
        assert server.stats.accepted == 1000


@pytest.mark.asyncio
async def test_half_close_flushes_everything_pending_then_closes() -> None:
    async with running_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        payload = random.Random(1).randbytes(4 * MiB)
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), 60)  # read() = until the server's EOF
        assert echoed == payload
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_line_framing_flushes_an_unterminated_last_line_on_eof() -> None:
    async with running_server(framing="line") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"one\ntwo\nthree")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"one\ntwo\nthree\n"
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_line_longer_than_max_line_gets_one_error_line_then_close() -> None:
    async with running_server(framing="line", max_line=16) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"short\n" + b"y" * 17 + b"\n")
        reply = await asyncio.wait_for(reader.read(), 10)
        assert reply == b"short\nERR line too long: limit is 16 bytes\n"
        writer.close()
        await writer.wait_closed()


def test_a_reset_mid_write_drops_only_that_connection(echo_server: ServerProcess) -> None:
    lines_before = len(echo_server.lines)
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", echo_server.port), timeout=10)
        sock.sendall(b"z" * (2 * MiB))  # the server is now writing the echo back
        # SO_LINGER 0: close() sends RST instead of FIN while the echo is in flight.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    payload = b"still here\x00"
    assert roundtrip(echo_server.port, [payload]) == payload
    noisy = [line for line in echo_server.lines[lines_before:] if "DEBUG" not in line]
    assert noisy == []


@pytest.mark.asyncio
async def test_server_side_sockets_have_tcp_nodelay() -> None:
    async with running_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"n")
        assert await reader.readexactly(1) == b"n"
        (conn,) = server.connections
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        writer.close()
        await writer.wait_closed()


def test_a_100_mib_message_is_echoed_exactly(echo_server: ServerProcess) -> None:
    block = random.Random(100).randbytes(MiB)
    payload = b"".join(block[i:] + block[:i] for i in range(100))  # 100 MiB, no period of 1 MiB
    assert roundtrip(echo_server.port, [payload], timeout=120) == payload


_MMAPPED_READS = """
import ctypes
import socket

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped_reads():
    # Reads as asyncio makes them: a 256 KiB bytes object, shrunk to what arrived.  Shrinking
    # a mapped block leaves it mapped (and freeing it then leaves the threshold as it is).
    left, right = socket.socketpair()
    held = []
    base = libc.mallinfo2().hblks
    for _ in range(16):
        left.send(b"x" * 100)
        held.append(right.recv(256 * 1024))
    mapped = libc.mallinfo2().hblks - base
    del held
    left.close()
    right.close()
    return mapped

before = mapped_reads()
from aecho.server.server import _raise_mmap_threshold
_raise_mmap_threshold()
after = mapped_reads()
print(before, after)
"""


def test_asyncio_reads_come_from_the_heap_not_from_mmap() -> None:
    """A fresh process maps each 256 KiB read buffer (an mmap, an mremap and a munmap per
    read: a third of the asyncio loop's throughput); after the server's start it does not."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and "MALLOC" not in k}
    out = subprocess.run(
        [sys.executable, "-c", _MMAPPED_READS], capture_output=True, text=True, timeout=60, env=env
    )
    if "mallinfo2" in out.stderr:
        pytest.skip("not glibc 2.33 or later")
    before, after = map(int, out.stdout.split())
    if before == 0:
        pytest.skip("this interpreter's malloc already serves 256 KiB blocks from its heap")
    assert after == 0, out.stdout


@pytest.mark.asyncio
async def test_the_server_raises_the_threshold_on_the_asyncio_loop_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr("aecho.server.server._raise_mmap_threshold", lambda: calls.append(1))
    async with running_server() as server:
        assert server.port
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    assert calls == ([] if uvloop else [1])
