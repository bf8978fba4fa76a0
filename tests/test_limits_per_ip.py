"""--max-connections-per-ip, the limits shared by serving processes, and the edge
options' bad input."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from aecho.config import ProxyMode, ServerConfig
from aecho.server.connection import Connection
from aecho.server.limits import SharedLimits, SharedTable
from aecho.server.prelude import Prelude
from aecho.server.registry import Registry
from aecho.tls import client_context
from tests.conftest import closed_without_reply, running_server


async def _open(port: int, host: str = "127.0.0.1") -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
    return writer


@pytest.mark.asyncio
async def test_per_ip_limit_refuses_only_the_excess() -> None:
    async with running_server(host="localhost", max_connections_per_ip=2) as server:
        first = [await _open(server.port) for _ in range(2)]
        assert await closed_without_reply(server.port)
        assert await closed_without_reply(server.port)
        assert server.stats.refused_per_ip == 2
        # The other address family is another client address.
        six = [addr for addr in server.addresses if isinstance(addr, tuple) and ":" in addr[0]]
        if six:
            other = await _open(server.port, "::1")
            other.close()
            await other.wait_closed()
        # The admitted ones are unaffected; closing one frees a slot.
        first[0].close()
        await first[0].wait_closed()
        for _ in range(100):
            if len(server.connections) == 1:
                break
            await asyncio.sleep(0.02)
        again = await _open(server.port)
        assert server.stats.accepted == 3 + len(six)
        for w in (first[1], again):
            w.close()
            await w.wait_closed()


@pytest.mark.asyncio
async def test_zero_means_no_limit() -> None:
    async with running_server(max_connections_per_ip=0) as server:
        writers = [await _open(server.port) for _ in range(20)]
        assert server.stats.refused_per_ip == 0
        for w in writers:
            w.close()
            await w.wait_closed()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--proxy-protocol", "v2", "--proxy-allow-from", "10.0.0.0/33"], "--proxy-allow-from"),
        (["--proxy-protocol", "v2", "--proxy-allow-from", "not-a-net"], "--proxy-allow-from"),
        (["--proxy-protocol", "v3"], "--proxy-protocol"),
        (["--max-connections-per-ip", "-1"], "--max-connections-per-ip"),
        (["--metrics-port", "70000"], "--metrics-port"),
    ],
)
def test_bad_edge_options_one_line(args: list[str], needle: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cafile", "/x.pem"], "only apply with --tls"),
        (["--tls", "--cafile", "/x.pem", "--insecure"], "choose one"),
        (["--tls", "--cafile", "/nonexistent.pem"], "no such file"),
    ],
)
def test_bad_client_tls_options_one_line(args: list[str], needle: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "aecho", "client", "127.0.0.1", "1", *args],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert err.count("\n") == 1 and needle in err, err


class _Interleaved(SharedTable):
    """A shared table on which ``between()`` runs once, as another process would, just
    after this process has read a sum and before it acts on it."""

    def __init__(self) -> None:
        super().__init__(2, sketch=True)
        self.between: Callable[[], None] | None = None

    def _other_process_runs(self) -> None:
        run, self.between = self.between, None
        if run is not None:
            run()

    def open_total(self) -> int:
        total = super().open_total()
        self._other_process_runs()
        return total

    def ip_count(self, ip: str) -> int:
        count = super().ip_count(ip)
        self._other_process_runs()
        return count


def test_two_processes_taking_the_last_place_at_once_never_both_get_it() -> None:
    """README, serving processes: "the limits are never passed: two processes admitting
    the last place at the same instant may both refuse (rarely), never both admit"."""
    table = _Interleaved()
    a, b = SharedLimits(3, 2, table, 0), SharedLimits(3, 2, table, 1)
    # The per-IP limit: one connection from 10.0.0.1 open in a, one place left.
    assert a.take_ip("10.0.0.1")
    got: list[bool] = []
    table.between = lambda: got.append(b.take_ip("10.0.0.1"))
    got.append(a.take_ip("10.0.0.1"))
    assert got.count(True) <= 1, got
    assert table.ip_count("10.0.0.1") <= 2
    # --max-connections: 2 of 3 open, one place left.
    table.set_open(0, 1)
    table.set_open(1, 1)
    admitted: list[bool] = []
    table.between = lambda: admitted.append(not b.full(1))
    admitted.append(not a.full(1))
    assert admitted.count(True) <= 1, admitted
    # Whoever refused took its count back; whoever admitted holds the place.
    assert table.open_total() == 2 + admitted.count(True)


class _Watched(SharedTable):
    """A shared table on which ``between()`` runs once, as another process would, the
    moment process 0 gives back a place or an address's count."""

    def __init__(self) -> None:
        super().__init__(2, sketch=True)
        self.between: Callable[[], None] | None = None
        self.rows = [0, 0]

    def _other_process_runs(self) -> None:
        run, self.between = self.between, None
        if run is not None:
            run()

    def set_open(self, slot: int, n: int) -> None:
        dropped = n < self.rows[slot]
        self.rows[slot] = n
        super().set_open(slot, n)
        if slot == 0 and dropped:
            self._other_process_runs()

    def ip_add(self, slot: int, ip: str, delta: int) -> None:
        super().ip_add(slot, ip, delta)
        if slot == 0 and delta < 0:
            self._other_process_runs()


def _registry(table: SharedTable) -> Registry:
    config = ServerConfig(port=0, max_connections=2, max_connections_per_ip=1).validate()
    return Registry(config, SharedLimits(2, 1, table, 0))


def _prelude(registry: Registry, ip: str) -> Prelude:
    prelude = Prelude(registry)
    prelude.peer = (ip, 40000)
    return prelude


def _taking_over(registry: Registry, prelude: Prelude, peer: tuple[str, int]) -> Connection:
    conn = Connection(registry)
    conn.peer = peer
    conn.takes_over = prelude
    return conn


def test_a_finished_prelude_hands_its_place_to_its_connection() -> None:
    """A TLS handshake that finishes hands its place, and its address's count, to the
    connection that serves the peer; neither is ever free in between, where another
    serving process could take the last one and the finished handshake be refused."""
    table = _Watched()
    here, other = _registry(table), SharedLimits(2, 1, table, 1)
    other.counted(1)  # the other process serves one connection: one place left
    prelude = _prelude(here, "10.0.0.1")
    assert here.hold(prelude, per_ip=True)  # TLS: the peer is the client
    took: list[bool] = []

    def other_process() -> None:
        took.append(not other.full(1))
        took.append(other.take_ip("10.0.0.1"))

    table.between = other_process
    conn = _taking_over(here, prelude, prelude.peer)
    assert here.admit(conn)
    assert took == []  # nothing was given back for another process to take
    assert here.connections == {conn} and not here.preludes and conn.takes_over is None
    assert table.open_total() == 2 and table.ip_count("10.0.0.1") == 1
    assert here.stats.accepted == 1 and here.stats.refused == 0
    here.release(prelude)  # what the prelude does after the hand-over: nothing left
    assert table.open_total() == 2 and table.ip_count("10.0.0.1") == 1
    table.between = None
    here.forget(conn)
    assert table.open_total() == 1 and table.ip_count("10.0.0.1") == 0


def test_a_proxy_header_counts_the_real_client_when_it_hands_over() -> None:
    """A trusted PROXY prelude counted no address (its peer is the proxy); the client the
    header names is counted at the hand-over, and one at its limit is refused there, its
    place freed."""
    table = _Watched()
    here, other = _registry(table), SharedLimits(2, 1, table, 1)
    assert other.take_ip("192.0.2.7")  # the client already has its one connection
    other.counted(1)
    prelude = _prelude(here, "10.0.0.9")  # the proxy
    assert here.hold(prelude, per_ip=False)
    conn = _taking_over(here, prelude, ("192.0.2.7", 5000))
    assert not here.admit(conn)
    assert not here.connections and not here.preludes
    assert table.open_total() == 1 and table.ip_count("192.0.2.7") == 1
    assert here.stats.refused_per_ip == 1
    prelude = _prelude(here, "10.0.0.9")
    assert here.hold(prelude, per_ip=False)
    conn = _taking_over(here, prelude, ("192.0.2.8", 5000))  # another client: served
    assert here.admit(conn)
    assert table.open_total() == 2 and table.ip_count("192.0.2.8") == 1


async def _served(port: int, ssl_ctx: ssl.SSLContext | None, first: bytes) -> bool:
    """Whether a client that sends ``first`` + ``hi`` gets ``hi`` back; False when the
    server turns it away (closed or reset, before or after a TLS handshake)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx)
    except (OSError, ssl.SSLError):
        return False
    try:
        writer.write(first + b"hi")
        return await asyncio.wait_for(reader.read(2), 10) == b"hi"
    except (OSError, ssl.SSLError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("prelude", ["tls", "proxy", "untrusted proxy"])
async def test_the_client_of_a_finished_prelude_is_served_at_the_limits(
    prelude: str, pems: dict[str, str]
) -> None:
    """README: a TLS connection keeps its place when its handshake ends (a PROXY one when
    its header does).  At --max-connections 1 and --max-connections-per-ip 1 the first
    client is served, counted once, not twice, and holds the one place: a second is
    turned away."""
    options: dict[str, Any] = {"max_connections": 1, "max_connections_per_ip": 1}
    ssl_ctx = None
    first = b""
    if prelude == "tls":
        options |= {"tls_cert": pems["cert"], "tls_key": pems["key"]}
        ssl_ctx = client_context(pems["ca"])
    else:
        options["proxy_protocol"] = ProxyMode.v1
        if prelude == "proxy":
            first = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 7\r\n"  # from a trusted proxy
        else:
            options["proxy_allow_from"] = ("10.0.0.0/8",)
    async with running_server(**options) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ssl_ctx)
        writer.write(first + b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
        assert len(server.connections) == 1 and not server.preludes
        assert not await _served(server.port, ssl_ctx, first)
        assert server.stats.accepted == 1
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
