"""README promises about serve, each checked where it can break.

Numbers in the assertions are the README's, written out, so a constant in the code that
drifts from the documentation fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aecho import cli
from aecho.config import ServerConfig
from tests.conftest import (
    ServerProcess,
    closed_without_reply,
    round_trip,
    running_server,
)
from tests.test_metrics import scrape

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _v2_header(payload_len: int = 12) -> bytes:
    """A PROXY v2 PROXY-command TCP4 header (192.0.2.1:1111 -> 192.0.2.2:7007) whose
    payload is ``payload_len`` bytes: the addresses, padded with a NOOP TLV."""
    addresses = bytes([192, 0, 2, 1, 192, 0, 2, 2]) + struct.pack("!HH", 1111, 7007)
    pad = payload_len - len(addresses)
    tlv = b"" if pad == 0 else b"\x04" + struct.pack("!H", pad - 3) + bytes(pad - 3)
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", payload_len) + addresses + tlv
    assert len(header) == 16 + payload_len
    return header


def _recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until EOF (a reset counts as EOF), at most ``limit`` bytes."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while len(got) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- defaults ----------------------------------------------------------------------------------


def test_serve_defaults_are_the_documented_ones() -> None:
    config = ServerConfig()
    assert config.max_line == 65536
    assert config.max_connections == 10000
    assert config.idle_timeout == 300
    assert config.graceful_timeout == 10
    assert config.backlog == 4096
    assert config.handler_timeout == 30
    assert config.tls_handshake_timeout == 10
    assert config.proxy_allow_from == ("127.0.0.1/32", "::1/128")
    # The command has defaults of its own: they must say the same.
    shown = {name: p.default for name, p in inspect.signature(cli.serve).parameters.items()}
    assert shown["max_line"] == 65536
    assert shown["max_connections"] == 10000
    assert shown["idle_timeout"] == 300
    assert shown["graceful_timeout"] == 10
    assert shown["backlog"] == 4096
    assert shown["handler_timeout"] == 30
    assert shown["tls_handshake_timeout"] == 10
    assert list(shown["proxy_allow_from"]) == ["127.0.0.1/32", "::1/128"]


def test_default_backlog_is_4096_capped_by_somaxconn(
    serve_process: Callable[..., ServerProcess],
) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss to read a listener's backlog")
    cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    server = serve_process()
    # For a listening socket ss shows the backlog in its Send-Q column.
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{server.port}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert out[0] == "LISTEN"
    assert int(out[2]) == min(4096, cap)
    assert server.stop() == 0


def test_a_line_of_65536_bytes_echoes_and_a_longer_one_is_refused(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--framing", "line")
    longest = b"x" * 65536 + b"\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(longest)
        got = b""
        while len(got) < len(longest):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        assert got == longest
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"y" * 65537 + b"\n")
        reply = _recv_all(sock)
    assert reply.startswith(b"ERR line too long: ")
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert server.stop() == 0


# -- PROXY protocol ----------------------------------------------------------------------------


def test_a_trusted_peer_without_a_proxy_header_is_closed_after_3_seconds(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--proxy-protocol", "v2")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert _recv_all(sock) == b""
        waited = time.monotonic() - started
    assert 2.95 <= waited < 4.5, f"closed after {waited:.2f} s"
    assert server.stop() == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_proxies_are_trusted_by_default(
    serve_process: Callable[..., ServerProcess], host: str
) -> None:
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    server = serve_process("--host", host, "--proxy-protocol", "v2")
    assert server.host == host
    # From a peer not trusted, a complete header would close the connection instead.
    with socket.create_connection((host, server.port), timeout=10) as sock:
        sock.sendall(_v2_header() + b"via the proxy")
        sock.shutdown(socket.SHUT_WR)
        assert _recv_all(sock) == b"via the proxy"
    assert server.stop() == 0


def test_unix_socket_peers_are_always_trusted_for_proxy_headers() -> None:
    directory = Path(tempfile.mkdtemp(prefix="aecho-"))  # short: AF_UNIX paths are limited
    path = directory / "s"
    server = ServerProcess(
        ["--unix", str(path), "--proxy-protocol", "v2", "--proxy-allow-from", "192.0.2.0/24"]
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(_v2_header() + b"over unix\x00\xff")
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == b"over unix\x00\xff"
        assert server.stop() == 0
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


async def _echoed(port: int, data: bytes, expect: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readexactly(len(expect)), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_proxy_v1_header_limit_is_107_bytes() -> None:
    longest = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
    assert len(longest) == 107
    too_long = b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n"
    assert len(too_long) == 108
    unterminated = b"PROXY " + b"9" * 102
    assert len(unterminated) == 108
    async with running_server(proxy_protocol="v1", metrics_port=0) as server:
        assert await _echoed(server.port, longest + b"after", b"after") == b"after"
        assert server.stats.proxy_errors == 0
        assert await closed_without_reply(server.port, too_long + b"after")
        # Refused as soon as it is over the limit, not at the 3 s header deadline.
        assert await closed_without_reply(server.port, unterminated, timeout=2.0)
        assert server.stats.proxy_errors == 2
        _, values = await scrape(server.metrics_port)
        assert values["aecho_connections_refused_total{reason=proxy_header}"] == 2


@pytest.mark.asyncio
async def test_proxy_v2_payload_limit_is_4_kib() -> None:
    async with running_server(proxy_protocol="v2", metrics_port=0) as server:
        assert await _echoed(server.port, _v2_header(4096) + b"after", b"after") == b"after"
        assert server.stats.proxy_errors == 0
        assert await closed_without_reply(server.port, _v2_header(4097) + b"after")
        assert server.stats.proxy_errors == 1
        _, values = await scrape(server.metrics_port)
        assert values["aecho_connections_refused_total{reason=proxy_header}"] == 1


# -- TLS ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_timed_out_tls_handshake_is_counted_as_refused(pems: dict[str, str]) -> None:
    async with running_server(
        tls_cert=pems["cert"], tls_key=pems["key"], tls_handshake_timeout=0.3, metrics_port=0
    ) as server:
        key = "aecho_connections_refused_total{reason=tls_handshake}"
        _, before = await scrape(server.metrics_port)
        assert before[key] == 0
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            values = before
            deadline = time.monotonic() + 5
            for _ in range(100):
                _, values = await scrape(server.metrics_port)
                if values[key] >= 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert values[key] == 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# -- descriptors -------------------------------------------------------------------------------


def _nofile(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def test_warns_when_max_connections_cannot_fit_under_the_hard_limit(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process(preexec_fn=_nofile(256, 256))
    assert server.stop() == 0
    warnings = [line for line in server.lines if " WARNING " in line]
    assert any("--max-connections 10000" in w and "256" in w for w in warnings), server.output


def test_no_descriptor_warning_when_the_hard_limit_has_room(
    serve_process: Callable[..., ServerProcess],
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 20_000:
        pytest.skip(f"needs a hard descriptor limit of 20,000 or more (have {hard})")
    # A low soft limit is no reason to warn: the server raises it to the hard one.
    server = serve_process(preexec_fn=_nofile(256, hard))
    assert server.stop() == 0
    assert "raised from 256" in server.output
    assert not [line for line in server.lines if "--max-connections" in line], server.output


# -- graceful stop -----------------------------------------------------------------------------


def test_at_a_stop_a_silent_connection_gets_a_second_for_its_first_bytes(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process()
    late = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with late, silent:
        server.signal(signal.SIGTERM)
        assert server.wait_stopping()
        stopping_at = time.monotonic()
        # Half-way through that second: late, with room left on a busy machine.
        time.sleep(0.5)
        assert round_trip(late, b"first bytes\x00\xff") == b"first bytes\x00\xff"
        # Then both are closed: the silent one after its second, not at the grace deadline.
        assert _recv_all(late) == b""
        assert _recv_all(silent) == b""
        rc = server.proc.wait(10)
        assert time.monotonic() - stopping_at < 5
    assert rc == 0


# -- fairness of inline line framing -----------------------------------------------------------

# About 20 us of work per message and an empty reply (one byte on the wire): a read of
# tiny lines handled in one go would hold the loop for a good part of a second.
COSTLY_HANDLER = """
import time


def costly(data):
    deadline = time.perf_counter() + 20e-6
    while time.perf_counter() < deadline:
        pass
    return b""
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_read_of_tiny_lines_does_not_hold_the_loop(
    serve_process: Callable[..., ServerProcess], tmp_path: Path, loop: str
) -> None:
    (tmp_path / "costly_handler.py").write_text(COSTLY_HANDLER)
    search = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    server = serve_process(
        "--loop",
        loop,
        "--framing",
        "line",
        "--handler",
        "costly_handler:costly",
        env={"PYTHONPATH": search},
    )
    lines = 60_000
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as flood,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as probe,
    ):
        assert round_trip(probe, b"p\n", lines=1) == b"\n"
        # One send: the server reads it in as few reads as the kernel allows, each
        # of tens of thousands of lines, which it must hand out in slices of 512.
        flood.sendall(b"a\n" * lines)
        flood.setblocking(False)
        answered = 0
        latencies: list[float] = []
        deadline = time.monotonic() + 20
        for _ in range(100_000):
            if answered >= lines or time.monotonic() > deadline:
                break
            started = time.monotonic()
            assert round_trip(probe, b"p\n", lines=1) == b"\n"
            latencies.append(time.monotonic() - started)
            with contextlib.suppress(BlockingIOError):
                while chunk := flood.recv(65536):
                    answered += len(chunk)
    # 512 messages take about 10 ms; the whole read, over a second (the one probe that
    # waits for it is the one to catch: hence the maximum, with room for a busy machine).
    assert max(latencies) < 0.5, f"a probe waited {max(latencies) * 1000:.0f} ms"
    assert answered == lines
    assert len(latencies) >= 10, "the flood was over before it could be probed"
    assert server.stop() == 0
