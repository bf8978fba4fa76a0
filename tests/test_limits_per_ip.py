"""--max-connections-per-ip, the limits shared by serving processes, and the edge
options' bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import pytest

from aecho.server.limits import SharedLimits, SharedTable
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
