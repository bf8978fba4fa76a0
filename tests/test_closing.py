"""How the server ends a connection: a lingering close while the peer still sends, the first
line of a connection that said nothing yet at a stop, and the idle sweep's view of a peer
that does not read, of one that reads slowly, and of one whose messages are at the
workers."""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import pytest

from aecho.config import Framing, Offload
from aecho.server import unsent
from aecho.server.connection import FramedConnection
from tests.conftest import ServerProcess, running_server, until

T = "tests.handlers_for_tests:"
TIMEOUT = 30.0


def _lines(count: int) -> list[bytes]:
    return [b"%07d" % i + b"x" * 56 + b"\n" for i in range(count)]


def _send_until_backed_up(
    sock: socket.socket, data: bytes, deadline: float, reset_ends: bool = False
) -> int:
    """Send without reading until nothing more goes for 0.3 s (every buffer on the way is
    full), or, with ``reset_ends``, until the server resets; returns the bytes sent."""
    sock.setblocking(False)
    sent = 0
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 0.3)
            if not writable:
                break
        except ConnectionResetError:
            if not reset_ends:
                raise
            break
    sock.setblocking(True)
    return sent


def _small_buffers(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def _read_to_end(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("offload", ["inline", "process"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_stop_while_the_peer_still_sends_delivers_every_reply_then_ends_cleanly(
    serve_process: Callable[..., ServerProcess], loop: str, offload: str
) -> None:
    """Closing with the peer's bytes unread would reset the connection, and the kernel
    would drop the replies it had yet to send: the server half-closes and lingers."""
    server = serve_process(
        "--framing", "line", "--loop", loop, "--offload", offload, "--pool-size", "1",
        "--graceful-timeout", "20",
    )  # fmt: skip
    stream = b"".join(_lines(400_000))  # 25.6 MB: more than every buffer on the way holds
    with _small_buffers(server.port) as sock:
        sent = _send_until_backed_up(sock, stream, time.monotonic() + TIMEOUT)
        assert 0 < sent < len(stream)
        server.signal(signal.SIGTERM)
        assert server.wait_stopping()
        # More lines after the stop: the server reads them only to drop them.
        _send_until_backed_up(sock, stream[sent : sent + 64 * 100], time.monotonic() + 5)
        got = _read_to_end(sock, TIMEOUT)  # a reset raises here
    assert got, "no reply at all"
    assert got.endswith(b"\n")
    assert got == stream[: len(got)]
    assert server.proc.wait(TIMEOUT) == 0


def test_a_refused_line_is_answered_while_the_peer_still_sends(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--framing", "line", "--max-line", "1024")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"ok\n" + b"y" * (4 << 20))  # no reset: the server reads to the end
        got = _read_to_end(sock, TIMEOUT)
    assert got.startswith(b"ok\nERR ")
    assert b"line too long" in got
    assert got.count(b"\n") == 2


@pytest.mark.asyncio
async def test_a_connection_silent_when_the_stop_began_is_served_its_first_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drained: list[FramedConnection] = []
    drain = FramedConnection.drain

    def drain_and_tell(conn: FramedConnection) -> None:
        drain(conn)
        drained.append(conn)

    monkeypatch.setattr(FramedConnection, "drain", drain_and_tell)
    async with running_server(framing=Framing.line) as server:
        peers = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
        await until(lambda: len(server.connections) == len(peers), "every peer accepted")
        stop = asyncio.create_task(server.shutdown())
        await until(lambda: len(drained) == len(peers), "the stop to reach every peer")
        for i, (_, writer) in enumerate(peers):
            writer.write(b"first %d\n" % i)
        for i, (reader, _) in enumerate(peers):
            # Served, then closed: a stopping server starts nothing after it.
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"first %d\n" % i
        await asyncio.wait_for(stop, TIMEOUT)
        for _, writer in peers:
            writer.close()


@pytest.mark.asyncio
async def test_the_idle_sweep_cuts_a_peer_that_never_reads() -> None:
    """A close would wait for ever for a write buffer the peer never takes."""
    async with running_server(idle_timeout=0.3) as server:
        with _small_buffers(server.port) as sock:
            sent = await asyncio.to_thread(
                _send_until_backed_up, sock, b"z" * (64 << 20), time.monotonic() + TIMEOUT, True
            )
            assert sent < 64 << 20
            started = time.monotonic()
            await until(lambda: not server.connections, "the connection to be cut", TIMEOUT)
            assert time.monotonic() - started < 10


@pytest.mark.asyncio
async def test_the_idle_sweep_resets_a_peer_that_never_reads_what_the_kernel_holds() -> None:
    """The echo fits in the kernel's send buffer, none of it in the server's: a peer that
    never takes it is reset too, not closed (the kernel would hold that echo on for it)."""
    burst = 256 << 10
    async with running_server(idle_timeout=0.3) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"z" * burst)
            await until(
                lambda: sum(conn.rx for conn in server.connections) == burst, "the burst read"
            )
            await until(lambda: not server.connections, "the connection to be cut", TIMEOUT)
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(_read_to_end, sock, TIMEOUT)


def test_where_the_kernel_will_not_say_what_it_holds_the_sweep_counts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off Linux, or on a socket that refuses the request, a connection is judged by its
    own write buffer alone, as before."""

    class Transport(asyncio.Transport):
        def __init__(self, sock: object) -> None:
            super().__init__()
            self.sock = sock

        def get_extra_info(self, name: str, default: object = None) -> object:
            return self.sock if name == "socket" else default

    closed = socket.socket()
    closed.close()
    for refusing in (closed, None, object()):
        assert unsent.unsent(Transport(refusing)) == 0
        unsent.reset(Transport(refusing))  # no error
    assert unsent.unsent(None) == 0
    sending, receiving = socket.socketpair()
    with sending, receiving:
        sending.send(b"x" * 100)  # not read: the kernel still holds it
        if unsent.OUTQ is not None and sys.platform == "linux":
            assert unsent.unsent(Transport(sending)) > 0
        monkeypatch.setattr(unsent, "OUTQ", None)  # a system without the request
        assert unsent.unsent(Transport(sending)) == 0


IDLE = 0.5  # --idle-timeout, s: far longer than the slow reader below ever pauses


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_idle_sweep_keeps_a_peer_that_reads_slowly(
    serve_process: Callable[..., ServerProcess], loop: str
) -> None:
    """The echo of a burst fits in the kernel's send buffer, so the server's own write
    buffer is empty while the peer, with a small receive buffer, takes it a little at a
    time for several idle timeouts: it is served to the last byte, and stays open."""
    server = serve_process("--idle-timeout", str(IDLE), "--loop", loop)
    burst = bytes(range(256)) * 4096  # 1 MiB
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", server.port))
        sender = threading.Thread(target=sock.sendall, args=(burst,), daemon=True)
        sender.start()
        started = time.monotonic()
        got = bytearray()
        for _ in range(len(burst)):  # at least a byte a read, or EOF
            if len(got) == len(burst) or time.monotonic() - started > TIMEOUT:
                break
            chunk = sock.recv(2048)
            if not chunk:
                break
            got += chunk
            time.sleep(0.005)  # the pace of a slow reader, not a wait for readiness
        sender.join(TIMEOUT)
        assert time.monotonic() - started > 2 * 1.25 * IDLE  # past the cut, twice over
        assert len(got) == len(burst) and got == burst
        sock.sendall(b"still there?")
        assert sock.recv(64) == b"still there?"


@pytest.mark.asyncio
async def test_the_idle_sweep_keeps_a_connection_whose_messages_are_at_the_workers() -> None:
    async with running_server(
        idle_timeout=0.1,
        offload=Offload.process,
        pool_size=1,
        framing=Framing.line,
        handler=T + "nap",  # 0.3 s a line: the peer waits three idle timeouts for each
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"a\nb\nc\n")
        for line in (b"a\n", b"b\n", b"c\n"):
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == line
        # Once nothing is at the workers, it is idle like any other.
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
