"""TLS: in-process servers with trustme certificates, openssl s_client, the client CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from aecho.config import ConfigError
from aecho.tls import client_context, server_context
from tests.conftest import ServerProcess, running_server, terminal


@pytest.mark.asyncio
async def test_tls_echo_exact_bytes(pems: dict[str, str]) -> None:
    async with running_server(tls_cert=pems["cert"], tls_key=pems["key"]) as server:
        ctx = client_context(pems["ca"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
        ssl_obj = writer.get_extra_info("ssl_object")
        assert ssl_obj.version() in ("TLSv1.2", "TLSv1.3")
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_tls_1_1_refused_and_plaintext_peer_harmless(pems: dict[str, str]) -> None:
    async with running_server(tls_cert=pems["cert"], tls_key=pems["key"]) as server:
        # A peer speaking plain text gets a closed connection, the server carries on.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello in clear\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        with pytest.warns(DeprecationWarning):
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", server.port, ssl=old)
        ctx = client_context(pems["ca"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        writer.write(b"ok")
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
        writer.close()
        await writer.wait_closed()


def test_openssl_s_client(
    pems: dict[str, str], serve_process: Callable[..., ServerProcess]
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (apt-get install openssl)")
    srv = serve_process("--tls-cert", pems["cert"], "--tls-key", pems["key"])
    proc = subprocess.Popen(
        [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{srv.port}",
            "-CAfile",
            pems["ca"],
            "-verify_return_error",
            "-quiet",
            "-ign_eof",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"echo over s_client\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no reply through openssl s_client within 60 s"
        assert proc.stdout.readline() == b"echo over s_client\n"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert srv.stop() == 0


def _client(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "aecho", "client", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def test_client_pipe_over_tls(
    pems: dict[str, str], serve_process: Callable[..., ServerProcess]
) -> None:
    srv = serve_process("--tls-cert", pems["cert"], "--tls-key", pems["key"])
    data = os.urandom(300_000) + b"\x00end"
    res = _client("127.0.0.1", str(srv.port), "--tls", "--cafile", pems["ca"], stdin=data)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    res = _client("127.0.0.1", str(srv.port), "--tls", "--insecure", stdin=b"x\n")
    assert (res.returncode, res.stdout) == (0, b"x\n")


def test_client_untrusted_certificate_one_line(
    pems: dict[str, str], serve_process: Callable[..., ServerProcess]
) -> None:
    srv = serve_process("--tls-cert", pems["cert"], "--tls-key", pems["key"])
    res = _client("127.0.0.1", str(srv.port), "--tls", stdin=b"x")
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "certificate not trusted" in err and "--cafile" in err


def test_client_pipe_over_tls_gives_up_on_a_silent_server(
    pems: dict[str, str], serve_process: Callable[..., ServerProcess]
) -> None:
    srv = serve_process(
        "--tls-cert", pems["cert"], "--tls-key", pems["key"],
        "--handler", "tests.handlers_for_tests:hang",
    )  # fmt: skip
    args = ("--tls", "--cafile", pems["ca"], "--timeout", "500ms")
    res = _client("127.0.0.1", str(srv.port), *args, stdin=b"hang")
    assert res.returncode == 1
    assert res.stderr.decode().splitlines() == [
        f"aecho: error: no reply from 127.0.0.1:{srv.port} within 0.5s of the last byte sent "
        "(--timeout sets how long; 0 waits forever)"
    ]


def test_client_interactive_over_tls_reports_a_close_at_once(
    pems: dict[str, str], serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """At the prompt the client reads TLS records that carry no data (resumption tickets) and
    still sees the server's close as soon as it comes."""
    srv = serve_process(
        "--tls-cert", pems["cert"], "--tls-key", pems["key"], "--idle-timeout", "1s"
    )
    with terminal(tmp_path, "127.0.0.1", str(srv.port), "--tls", "--cafile", pems["ca"]) as term:
        os.write(term.fd, b"over tls\n")
        assert term.read_until(b"client > ").count(b"over tls") == 2
        screen = term.read_until(b"server closed the connection", timeout=20)
        assert f"server closed the connection (127.0.0.1:{srv.port})".encode() in screen
        assert term.finish() == 1
        assert term.line_mode()


def test_bad_tls_files_one_line(pems: dict[str, str], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key = tmp_path / "other.pem"
    trustme.CA().issue_cert("x.test").private_key_pem.write_to_path(other_key)
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", pems["key"]], "no such file"),
        (["--tls-cert", pems["cert"], "--tls-key", str(garbage)], "cannot load"),
        (["--tls-cert", pems["cert"], "--tls-key", str(other_key)], "does not match"),
        (["--tls-cert", pems["cert"]], "go together"),
        (["--tls-cert", str(tmp_path), "--tls-key", pems["key"]], "directory"),
    ]
    for args, needle in cases:
        res = subprocess.run(
            [sys.executable, "-m", "aecho", "serve", "--port", "0", *args],
            capture_output=True,
            timeout=60,
            text=True,
        )
        assert res.returncode != 0, args
        assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_contexts_refuse_old_protocols(pems: dict[str, str]) -> None:
    assert server_context(pems["cert"], pems["key"]).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context().minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="no such file"):
        client_context("/nonexistent/ca.pem")


# -- handshakes count from accept ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_silent_peer_is_closed_at_the_handshake_timeout(pems: dict[str, str]) -> None:
    async with running_server(
        tls_cert=pems["cert"], tls_key=pems["key"], tls_handshake_timeout=0.5
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.4 < time.monotonic() - started < 5
        writer.close()
        assert server.stats.tls_failures == 1
        assert not server.preludes and not server.connections
        # Half a ClientHello, then silence: the same.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert server.stats.tls_failures == 2


@pytest.mark.asyncio
async def test_unfinished_handshakes_count_against_max_connections(pems: dict[str, str]) -> None:
    async with running_server(tls_cert=pems["cert"], tls_key=pems["key"], max_connections=3) as s:
        idle = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(3)]
        for _ in range(200):
            if len(s.preludes) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(s.preludes) == 3
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", s.port, ssl=client_context(pems["ca"])), 10
            )
        assert s.stats.refused >= 1
        for _, writer in idle:
            writer.close()


def _fd_limit_128() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def _tls_echo_from(source: str, port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with (
            socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(source, 0)
            ) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"served")
            return tls.recv(100) == b"served"
    except OSError:
        return False


@pytest.mark.slow
def test_idle_sockets_from_one_address_do_not_lock_out_tls_clients_from_another(
    pems: dict[str, str], serve_process: Callable[..., ServerProcess]
) -> None:
    srv = serve_process(
        "--tls-cert", pems["cert"], "--tls-key", pems["key"], "--max-connections-per-ip", "2",
        preexec_fn=_fd_limit_128,
    )  # fmt: skip
    attackers: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", srv.port))
            attackers.append(sock)
        # Every attacking connection is established (or refused) before the clients come.
        pending, deadline = list(attackers), time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            _, done, _ = select.select([], pending, [], 0.5)
            pending = [s for s in pending if s not in done]
        ctx = client_context(pems["ca"])
        served = sum(_tls_echo_from("127.0.0.2", srv.port, ctx) for _ in range(10))
        assert served >= 9, f"{served} of 10 TLS clients served"
    finally:
        for sock in attackers:
            sock.close()
    assert srv.stop() == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-handshake"])
async def test_a_silent_peer_gets_the_whole_idle_timeout(pems: dict[str, str], tls: bool) -> None:
    """README: connections close between 1x and 1.25x the timeout, a TLS peer still in its
    handshake included (it once lost a sweep: closed at 0.75x)."""
    timeout = 0.8
    options = {"tls_cert": pems["cert"], "tls_key": pems["key"]} if tls else {}
    async with running_server(idle_timeout=timeout, tls_handshake_timeout=30, **options) as s:
        loop = asyncio.get_running_loop()

        async def silent(delay: float) -> float:
            await asyncio.sleep(delay)  # spread over one sweep interval: every phase of it
            opened = loop.time()  # the server counts from accept: not before this
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            try:
                assert await asyncio.wait_for(reader.read(), 10) == b""
                return loop.time() - opened
            finally:
                writer.close()

        spread = [i * timeout / 4 / 6 for i in range(6)]
        closed_after = await asyncio.gather(*(silent(d) for d in spread))
    assert min(closed_after) >= timeout * 0.99, closed_after
    assert max(closed_after) <= timeout * 1.25 + 0.3, closed_after
