"""Prometheus metrics on 127.0.0.1:--metrics-port, read from the server at scrape time.

Nothing here runs per message: the server keeps plain integer counters
(:class:`aecho.stats.Stats` and each connection's ``rx``/``tx``) and the
collector turns them into metric families only when a scrape arrives.  The
HTTP endpoint runs on the server's own event loop, so a scrape sees one
consistent moment and needs no locks or threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aecho.connection import ProxyPrelude

if TYPE_CHECKING:
    from aecho.server import Server

log = logging.getLogger("aecho.metrics")

REQUEST_TIMEOUT_S = 10.0


class ServerCollector(Collector):
    """Builds every aecho metric from the server's counters when scraped."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats = server.stats
        open_now = 0
        rx, tx = stats.bytes_in, stats.bytes_out
        for conn in list(server.connections):
            if isinstance(conn, ProxyPrelude):
                continue
            open_now += 1
            rx += conn.rx
            tx += conn.bytes_out
        yield GaugeMetricFamily(
            "aecho_connections_open",
            "Connections open now (those still sending a PROXY header excluded).",
            value=open_now,
        )
        yield CounterMetricFamily(
            "aecho_connections_accepted", "Connections admitted.", value=stats.accepted
        )
        refused = CounterMetricFamily(
            "aecho_connections_refused", "Connections closed at once, by reason.", labels=["reason"]
        )
        refused.add_metric(["max_connections"], stats.refused)
        refused.add_metric(["per_ip"], stats.refused_per_ip)
        refused.add_metric(["proxy_header"], stats.proxy_errors)
        yield refused
        yield CounterMetricFamily(
            "aecho_bytes_received", "Bytes read from stream connections.", value=rx
        )
        yield CounterMetricFamily(
            "aecho_bytes_sent", "Bytes written to stream connections.", value=tx
        )
        yield CounterMetricFamily(
            "aecho_messages",
            "Messages handled on the framed path (the raw inline echo counts bytes only).",
            value=stats.messages,
        )
        yield CounterMetricFamily(
            "aecho_handler_errors", "Messages whose handler raised.", value=stats.handler_errors
        )
        yield CounterMetricFamily(
            "aecho_pool_restarts", "Worker pools rebuilt after a crash.", value=stats.pool_restarts
        )
        yield CounterMetricFamily(
            "aecho_udp_datagrams", "UDP datagrams echoed.", value=stats.udp_datagrams
        )
        yield CounterMetricFamily(
            "aecho_udp_bytes", "Bytes in UDP datagrams echoed.", value=stats.udp_bytes
        )
        latency = stats.offload_latency
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(latency.bounds, latency.counts, strict=False):
            cumulative += count
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", latency.count))
        yield HistogramMetricFamily(
            "aecho_offload_latency_seconds",
            "Time from the first message of a batch being queued for a worker pool to the"
            " batch's replies, counted once per message.",
            buckets=buckets,
            sum_value=latency.total,
        )


class MetricsServer:
    """A minimal HTTP/1.0 endpoint: GET /metrics (or /) returns the exposition text."""

    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        self.port = 0
        self._srv: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        """Listen on 127.0.0.1:``port`` (0 picks a free port, then in ``self.port``).

        Raises:
            OSError: the port cannot be bound.
        """
        self._srv = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._srv.sockets[0].getsockname()[1]

    def render(self) -> bytes:
        """The current exposition text."""
        return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path in (b"/metrics", b"/"):
                status, body, ctype = "200 OK", self.render(), CONTENT_TYPE_LATEST
            else:
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            header = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == b"HEAD" else header + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            log.debug("metrics request failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT_S)

    async def close(self) -> None:
        """Stop listening."""
        if self._srv is not None:
            self._srv.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._srv.wait_closed(), 1.0)
