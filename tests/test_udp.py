"""UDP echo (RFC 862) on the TCP port: plain sockets and socat."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from aecho.server.udp import MAX_DATAGRAM
from tests.conftest import ServerProcess, running_server


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed; .ci/run installs it with apt-get")
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return path


def _roundtrip(port: int, payload: bytes, family: int = socket.AF_INET) -> bytes:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(payload, (host, port))
        data, _ = s.recvfrom(MAX_DATAGRAM + 1)
        return data


@pytest.mark.asyncio
async def test_udp_sizes_exact() -> None:
    import asyncio

    async with running_server(udp=True) as server:
        loop = asyncio.get_running_loop()
        for size in (0, 1, 512, 1472, 9000, MAX_DATAGRAM):
            payload = os.urandom(size)
            got = await loop.run_in_executor(None, _roundtrip, server.port, payload)
            assert got == payload, size
        assert server.stats.udp_datagrams == 6
        # TCP still answers on the same port.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"tcp too")
        assert await asyncio.wait_for(reader.readexactly(7), 10) == b"tcp too"
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_one_reply_per_datagram_in_burst() -> None:
    import asyncio

    async with running_server(udp=True) as server:

        def burst() -> list[bytes]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(10)
                s.connect(("127.0.0.1", server.port))
                sent = [i.to_bytes(4, "big") * 10 for i in range(200)]
                for d in sent:
                    s.send(d)
                return sorted(s.recv(100) for _ in sent)

        got = await asyncio.get_running_loop().run_in_executor(None, burst)
        assert got == sorted(i.to_bytes(4, "big") * 10 for i in range(200))


@pytest.mark.slow
def test_udp_ipv6_and_socat(serve_process: Callable[..., ServerProcess]) -> None:
    socat = _need("socat")
    srv = serve_process("--udp", "--host", "localhost")
    payload = b"via socat \x00\xff\n"
    res = subprocess.run(
        [socat, "-t", "5", "-T", "10", "-", f"UDP4:127.0.0.1:{srv.port}"],
        input=payload,
        capture_output=True,
        timeout=60,
    )
    assert res.stdout == payload, res.stderr
    if socket.has_ipv6 and "[::1]" in srv.output:
        assert _roundtrip(srv.port, b"six", socket.AF_INET6) == b"six"
    assert srv.stop() == 0


def test_udp_with_unix_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--udp", "--unix", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--udp" in res.stderr


def _udp_blocker() -> socket.socket:
    """A UDP socket on a port whose TCP twin is free (so only the UDP bind can fail)."""
    for _ in range(50):
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.1", 0))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", blocker.getsockname()[1]))
                return blocker
            except OSError:
                blocker.close()
    raise AssertionError("no port with a free TCP twin")


def test_udp_port_in_use_one_line() -> None:
    with _udp_blocker() as blocker:
        port = blocker.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "aecho", "serve", "--udp", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "udp" in res.stderr and "in use" in res.stderr
