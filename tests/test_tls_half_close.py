"""A TLS peer that ends its input (a close_notify, or a TCP half-close without one) still
gets every reply owed, then the server's close_notify; the server's own lingering close
works over TLS; the handshake is bounded by its timeout however the peer stalls.

The clients run TLS themselves (``SSLContext.wrap_bio`` over a plain connection), so they
can send a close_notify, or shut down their sending side, and read on."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import time
from typing import Any

import pytest

from aecho.config import Framing, Offload
from aecho.server import connection
from aecho.tls import client_context, server_context
from tests.conftest import running_server, until

TIMEOUT = 30.0


def _lines(count: int) -> bytes:
    return b"".join(b"%06d " % i + bytes(range(32, 32 + i % 90)) + b"\n" for i in range(count))


class TlsPeer:
    """A TLS client over a plain asyncio connection: it decides when it reads, sends its
    close_notify or half-closes TCP."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self.plain = bytearray()
        self.close_notify = False  # the server's close_notify came

    @classmethod
    async def connect(cls, port: int, ca: str, rcvbuf: int = 0) -> TlsPeer:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        peer = cls(reader, writer)
        tls = client_context(ca).wrap_bio(peer._in, peer._out, server_hostname="127.0.0.1")
        peer.tls = tls
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await peer._flush()
                    data = await reader.read(65536)
                    assert data, "the server closed during the handshake"
                    peer._in.write(data)
        await peer._flush()
        return peer

    async def _flush(self) -> None:
        if self._out.pending:
            self.writer.write(self._out.read())
            await self.writer.drain()

    async def send(self, data: bytes) -> None:
        assert self.tls is not None
        self.tls.write(data)
        await self._flush()

    async def send_close_notify(self) -> None:
        assert self.tls is not None
        with contextlib.suppress(ssl.SSLWantReadError):  # the server's comes later
            self.tls.unwrap()
        await self._flush()

    def shut_write(self) -> None:
        self.writer.write_eof()

    async def read_to_end(self) -> bool:
        """Read until the server closes; True when it sent its close_notify first."""
        assert self.tls is not None
        async with asyncio.timeout(TIMEOUT):
            while not self.close_notify:
                data = await self.reader.read(65536)
                if not data:
                    return False
                self._in.write(data)
                try:
                    while chunk := self.tls.read(65536):
                        self.plain += chunk
                    self.close_notify = True  # an empty read: the close_notify
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    self.close_notify = True
            # After the close_notify the server closes TCP too.
            assert await self.reader.read() == b""
        return True

    def close(self) -> None:
        self.writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["close_notify", "shutdown"])
@pytest.mark.parametrize("framing", [Framing.line, Framing.raw])
async def test_every_reply_after_the_peer_ends_its_input(
    pems: dict[str, str], ending: str, framing: Framing
) -> None:
    """README: a TLS peer that sends its lines, then a close_notify (or shuts down its
    sending side), gets every reply, byte for byte, then the server's close_notify.  Line
    framing writes 20,000 replies in slices, most of them after the end of input came."""
    payload = _lines(20_000)
    async with running_server(
        tls_cert=pems["cert"], tls_key=pems["key"], framing=framing
    ) as server:
        peer = await TlsPeer.connect(server.port, pems["ca"])
        try:
            await peer.send(payload)
            if ending == "close_notify":
                await peer.send_close_notify()
            else:
                peer.shut_write()
            assert await peer.read_to_end(), "no close_notify from the server"
        finally:
            peer.close()
        assert len(peer.plain) == len(payload) and bytes(peer.plain) == payload
        await until(lambda: not server.connections, "the connection to end", TIMEOUT)
        assert server.stats.bytes_in == server.stats.bytes_out == len(payload)


@pytest.mark.asyncio
async def test_replies_from_the_workers_after_a_close_notify(pems: dict[str, str]) -> None:
    """The same with --offload process: every reply comes from a worker after the
    close_notify has arrived."""
    payload = _lines(300)
    async with running_server(
        tls_cert=pems["cert"],
        tls_key=pems["key"],
        framing=Framing.line,
        offload=Offload.process,
        pool_size=1,
    ) as server:
        peer = await TlsPeer.connect(server.port, pems["ca"])
        try:
            await peer.send(payload)
            await peer.send_close_notify()
            assert await peer.read_to_end()
        finally:
            peer.close()
        assert bytes(peer.plain) == payload


@pytest.mark.asyncio
async def test_a_peer_that_never_reads_is_not_held_past_the_idle_timeout(
    pems: dict[str, str],
) -> None:
    """A peer that sends, ends its input and never reads its replies: reading stops
    (backpressure) with the write buffer near its high-water mark, and the idle sweep
    resets the connection within 1.25x the timeout."""
    timeout = 1.0
    payload = _lines(200_000)  # about 10 MiB of replies: more than every buffer holds
    async with running_server(
        tls_cert=pems["cert"], tls_key=pems["key"], framing=Framing.line, idle_timeout=timeout
    ) as server:
        peer = await TlsPeer.connect(server.port, pems["ca"], rcvbuf=1 << 16)
        try:
            assert peer.tls is not None
            peer.tls.write(payload)
            with contextlib.suppress(ssl.SSLWantReadError):
                peer.tls.unwrap()
            peer.writer.write(peer._out.read())  # buffered by the client: no drain
            await until(lambda: server.connections, "the handshake's end", TIMEOUT)
            conn = next(iter(server.connections))
            transport = conn.transport
            assert transport is not None
            await until(lambda: transport.get_write_buffer_size() > 0, "replies", TIMEOUT)
            stalled = time.monotonic()
            most = 0
            while server.connections and time.monotonic() - stalled < 10:
                most = max(most, transport.get_write_buffer_size())
                await asyncio.sleep(0.01)
            assert not server.connections
            assert time.monotonic() - stalled <= timeout * 1.25 + 1.0
            # The buffer stayed near the high-water mark: reading paused.
            high = server.config.write_high
            assert most <= high + server.config.write_low + 65536, (most, high)
            assert conn.rx < len(payload)
        finally:
            peer.close()


@pytest.mark.asyncio
async def test_a_refused_tls_peer_that_goes_on_sending_gets_a_lingering_close(
    pems: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line over --max-line ends the connection while the peer still sends: over TLS
    too the server writes the replies owed and its error line, then its close_notify and
    a TCP half-close, and reads on (dropping what comes) until the linger limit, so no
    reset drops what it wrote; a peer that never stops sending is closed at that limit."""
    monkeypatch.setattr(connection, "LINGER_MAX_S", 1.0)
    async with running_server(
        tls_cert=pems["cert"], tls_key=pems["key"], framing=Framing.line, max_line=100
    ) as server:
        # A peer that goes on sending for a while, then reads: every byte the server wrote.
        peer = await TlsPeer.connect(server.port, pems["ca"])
        try:
            await peer.send(b"ok\n" + b"x" * 200)
            for _ in range(4):
                await asyncio.sleep(0.1)  # more than the server reads before its close
                await peer.send(b"y" * 1000)
            await peer.send_close_notify()
            assert await peer.read_to_end()
            assert bytes(peer.plain) == b"ok\nERR line too long: limit is 100 bytes\n"
        finally:
            peer.close()
        # A peer that never stops sending: closed at the linger limit, not before.
        peer = await TlsPeer.connect(server.port, pems["ca"])
        try:
            await until(lambda: server.connections, "the handshake's end", TIMEOUT)
            await peer.send(b"x" * 200)
            started = time.monotonic()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while time.monotonic() - started < 10 and server.connections:
                    await peer.send(b"z" * 100)
                    await asyncio.sleep(0.05)
            lingered = time.monotonic() - started
        finally:
            peer.close()
        assert not server.connections
        assert 0.9 <= lingered <= 1.0 + 1.5, lingered


async def _handshake_cut(port: int, stall: Any) -> float:
    """Seconds from connect until the server closes a peer that ``stall`` keeps busy."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        await stall(reader, writer)
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(TIMEOUT):
                while await reader.read(65536):
                    pass
        return time.monotonic() - started
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_a_stalled_handshake_is_cut_at_the_handshake_timeout(pems: dict[str, str]) -> None:
    """A peer that sends its ClientHello and then never finishes, or one that trickles its
    ClientHello a byte at a time, is closed at --tls-handshake-timeout, counted as a failed
    handshake, and gives back its place and its address's count."""
    hello_in = ssl.MemoryBIO()
    hello_out = ssl.MemoryBIO()
    hello_tls = client_context(pems["ca"]).wrap_bio(
        hello_in, hello_out, server_hostname="127.0.0.1"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        hello_tls.do_handshake()
    hello = hello_out.read()

    async def after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(hello)  # the server answers, and waits for our Finished forever

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in hello[:-1]:
            if writer.is_closing() or reader.at_eof():
                return
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)  # never the whole hello within the timeout

    async with running_server(
        tls_cert=pems["cert"],
        tls_key=pems["key"],
        tls_handshake_timeout=0.5,
        max_connections_per_ip=1,
    ) as server:
        for number, stall in enumerate((after_hello, trickle), 1):
            took = await _handshake_cut(server.port, stall)
            assert 0.4 < took < 5, (stall.__name__, took)
            assert server.stats.tls_failures == number
            await until(lambda: not server.preludes, "the prelude to go", TIMEOUT)
            assert not server.connections
        # The one place the address has is free again: a client is served.
        peer = await TlsPeer.connect(server.port, pems["ca"])
        try:
            await peer.send(b"served\n")
            await peer.send_close_notify()
            assert await peer.read_to_end()
            assert bytes(peer.plain) == b"served\n"
        finally:
            peer.close()


def test_a_blocking_client_that_reads_before_it_unwraps(pems: dict[str, str]) -> None:
    """README: a client with a blocking SSLSocket reads its replies, then unwraps: the
    server answers its close_notify with its own."""

    async def serve_one() -> None:
        async with running_server(
            tls_cert=pems["cert"], tls_key=pems["key"], framing=Framing.line
        ) as server:
            await asyncio.to_thread(_blocking_client, server.port, pems["ca"])

    asyncio.run(serve_one())


def _blocking_client(port: int, ca: str) -> None:
    payload = _lines(500)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        tls = client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            assert chunk
            got += chunk
        assert bytes(got) == payload
        plain = tls.unwrap()  # returns once the server's close_notify came
        assert plain.recv(1) == b""
        plain.close()


@pytest.mark.asyncio
async def test_a_peer_that_asks_to_renegotiate_is_refused_and_others_are_served(
    pems: dict[str, str],
) -> None:
    """A TLS 1.2 peer asks to renegotiate mid-stream (``openssl s_client``'s ``R``): the
    server refuses (a no_renegotiation alert), echoes nothing after it, and goes on
    serving other peers."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    async with running_server(
        tls_cert=pems["cert"], tls_key=pems["key"], framing=Framing.line
    ) as server:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{server.port}",
            "-CAfile", pems["ca"],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"hello\n")
            async with asyncio.timeout(TIMEOUT):
                while (await proc.stdout.readline()) not in (b"hello\n", b""):
                    pass  # the handshake's report, then the echo: it is served
                proc.stdin.write(b"R\n")  # s_client's command: renegotiate
                await proc.stdin.drain()
                rest = await proc.stdout.read()  # until the connection is gone
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert b"RENEGOTIATING" in rest and b"no renegotiation" in rest, rest
        assert proc.returncode != 0
        peer = await TlsPeer.connect(server.port, pems["ca"])
        try:
            await peer.send(b"still here\n")
            await peer.send_close_notify()
            assert await peer.read_to_end()
        finally:
            peer.close()
        assert bytes(peer.plain) == b"still here\n"


def test_renegotiation_is_refused(pems: dict[str, str]) -> None:
    """README: the server refuses renegotiation (its record layer runs no handshake in
    mid-stream)."""
    assert server_context(pems["cert"], pems["key"]).options & ssl.OP_NO_RENEGOTIATION
