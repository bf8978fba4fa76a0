"""Prometheus metrics: exposition text built from counter snapshots when scraped.

Nothing here runs per message: servers keep plain integer counters
(:class:`aecho.server.stats.Stats`) and a scrape turns snapshots of them into metric
families.  A snapshot source returns ``(labels, stats)`` pairs: one for a single
server, one per serving process under ``--workers`` (summed here, with a
per-process series where it helps).  Reads Stats, never the Server class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aecho.server.stats import Stats

log = logging.getLogger("aecho.server.metrics")

REQUEST_TIMEOUT_S = 10.0

# (labels, stats) pairs; labels None: counted in the totals only (processes that exited).
Snapshots = Callable[[], list[tuple[dict[str, str] | None, Stats]]]


class StatsCollector(Collector):
    """Builds every aecho metric from counter snapshots when scraped."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        parts = self.snapshots()
        stats = Stats()
        for _, part in parts:
            stats.add(part)
        labelled = [(labels, part) for labels, part in parts if labels]
        keys = sorted({key for labels, _ in labelled for key in labels})
        open_now = GaugeMetricFamily(
            "aecho_connections_open",
            "Connections open now (those still in a TLS handshake or sending a PROXY header "
            "excluded)" + (", per serving process." if keys else "."),
            labels=keys or None,
        )
        if keys:
            for labels, part in labelled:
                open_now.add_metric([labels.get(k, "") for k in keys], part.connections_open)
        else:
            open_now.add_metric([], stats.connections_open)
        yield open_now
        yield CounterMetricFamily(
            "aecho_connections_accepted", "Connections admitted.", value=stats.accepted
        )
        refused = CounterMetricFamily(
            "aecho_connections_refused", "Connections closed at once, by reason.", labels=["reason"]
        )
        refused.add_metric(["max_connections"], stats.refused)
        refused.add_metric(["per_ip"], stats.refused_per_ip)
        refused.add_metric(["proxy_header"], stats.proxy_errors)
        refused.add_metric(["tls_handshake"], stats.tls_failures)
        yield refused
        yield CounterMetricFamily(
            "aecho_bytes_received", "Bytes read from stream connections.", value=stats.bytes_in
        )
        yield CounterMetricFamily(
            "aecho_bytes_sent", "Bytes written to stream connections.", value=stats.bytes_out
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


def make_registry(snapshots: Snapshots) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshots))
    return registry


def respond(registry: CollectorRegistry, head: bytes) -> bytes:
    """The whole HTTP/1.0 response to a request whose head (up to the blank line) is ``head``."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    method = parts[0] if parts else b""
    path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
    if method not in (b"GET", b"HEAD"):
        status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
    elif path in (b"/metrics", b"/"):
        status, body, ctype = "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST
    else:
        status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
    header = (
        f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if method == b"HEAD" else header + body


class MetricsServer:
    """A minimal HTTP/1.0 endpoint on the server's own loop: GET /metrics (or /).

    A scrape runs on the loop, so it sees one consistent moment and needs no locks.
    """

    def __init__(self, snapshots: Snapshots) -> None:
        self.registry = make_registry(snapshots)
        self.port = 0
        self._srv: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        """Listen on 127.0.0.1:``port`` (0 picks a free port, then in ``self.port``).

        Raises:
            OSError: the port cannot be bound.
        """
        self._srv = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._srv.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            writer.write(respond(self.registry, head))
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
