"""Prometheus metrics: scraped while load runs, counters move as they should."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aecho.config import Framing
from tests.conftest import running_server


async def scrape(port: int | None, path: str = "/metrics") -> tuple[int, dict[str, float]]:
    assert port is not None, "no metrics endpoint"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    values: dict[str, float] = {}
    if status == 200:
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return status, values


async def _client(port: int, rounds: int, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(rounds):
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", [Framing.raw, Framing.line])
async def test_counters_move_under_load(framing: Framing) -> None:
    async with running_server(metrics_port=0, framing=framing) as server:
        port = server.metrics_port
        status, before = await scrape(port)
        assert status == 200
        assert before["aecho_connections_open"] == 0
        assert before["aecho_connections_accepted_total"] == 0

        # Hold some connections open while load runs, and scrape in the middle of it.
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        payload = b"m" * 99 + b"\n"
        load = asyncio.gather(*(_client(server.port, 50, payload) for _ in range(20)))
        _, during = await scrape(port)
        await load
        _, after = await scrape(port)

        assert during["aecho_connections_open"] >= 5
        assert after["aecho_connections_open"] == 5
        assert after["aecho_connections_accepted_total"] == 25
        total = 20 * 50 * len(payload)
        assert after["aecho_bytes_received_total"] == total
        assert after["aecho_bytes_sent_total"] == total
        assert before["aecho_bytes_received_total"] <= during["aecho_bytes_received_total"]
        if framing is Framing.line:
            assert after["aecho_messages_total"] == 20 * 50
        assert after["aecho_connections_refused_total{reason=max_connections}"] == 0
        assert after["aecho_offload_latency_seconds_count"] == 0
        assert "aecho_pool_restarts_total" in after
        assert "aecho_handler_errors_total" in after

        for _, writer in held:
            writer.close()
            await writer.wait_closed()
        # Closed connections' bytes stay counted: counters never go back.
        _, final = await scrape(port)
        assert final["aecho_connections_open"] == 0
        assert final["aecho_bytes_received_total"] == total


@pytest.mark.asyncio
async def test_refusals_and_udp_counted() -> None:
    async with running_server(metrics_port=0, max_connections=2, udp=True) as server:
        keep = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for _, w in keep:
            w.write(b"x")
        for r, _ in keep:
            assert await asyncio.wait_for(r.readexactly(1), 10) == b"x"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

        def udp() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(10)
                s.sendto(b"dgram", ("127.0.0.1", server.port))
                return s.recv(100)

        assert await asyncio.get_running_loop().run_in_executor(None, udp) == b"dgram"
        _, values = await scrape(server.metrics_port)
        assert values["aecho_connections_refused_total{reason=max_connections}"] == 1
        assert values["aecho_udp_datagrams_total"] == 1
        assert values["aecho_udp_bytes_total"] == 5
        for _, w in keep:
            w.close()
            await w.wait_closed()


@pytest.mark.asyncio
async def test_other_paths_and_methods() -> None:
    async with running_server(metrics_port=0) as server:
        assert (await scrape(server.metrics_port, "/nope"))[0] == 404
        # Garbage on the metrics port closes that request only.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
        writer.write(b"\x00" * 100)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await writer.wait_closed()
        assert (await scrape(server.metrics_port))[0] == 200


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one", "workers"])
def test_metrics_port_in_use_one_line(workers: tuple[str, ...]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        serve = [sys.executable, "-m", "aecho", "serve", "--port", "0", *workers]
        res = subprocess.run(
            [*serve, "--metrics-port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "metrics port" in res.stderr, res.stderr
    assert "in use" in res.stderr
    assert res.stderr.rstrip().endswith("Choose another --metrics-port"), res.stderr
