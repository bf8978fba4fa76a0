"""Server counters, read by logs and metrics.  Plain attributes, no locking: one event loop
writes them.  Pure: no asyncio here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (seconds) of the offload latency buckets; the last bucket is +Inf.
OFFLOAD_LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(slots=True)
class LatencyBuckets:
    """A cumulative-friendly histogram with fixed bounds (Prometheus style)."""

    bounds: tuple[float, ...] = OFFLOAD_LATENCY_BOUNDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(OFFLOAD_LATENCY_BOUNDS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float, n: int = 1) -> None:
        """Record ``n`` observations of ``seconds`` each."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += n
        self.total += seconds * n
        self.count += n


@dataclass(slots=True)
class Stats:
    accepted: int = 0
    refused: int = 0
    messages: int = 0
    handler_errors: int = 0
    pool_restarts: int = 0
    # Bytes of connections that have closed; open ones keep their own tallies
    # (Connection.rx/tx), summed in at scrape time so reads cost one increment.
    bytes_in: int = 0
    bytes_out: int = 0
    refused_per_ip: int = 0
    proxy_errors: int = 0
    udp_datagrams: int = 0
    udp_bytes: int = 0
    offload_latency: LatencyBuckets = field(default_factory=LatencyBuckets)
