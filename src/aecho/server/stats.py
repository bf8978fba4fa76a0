"""Server counters, read by logs and metrics.  Plain attributes, no locking: one event loop
writes them.  Pure: no asyncio here.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from typing import Any

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

    def add(self, other: LatencyBuckets) -> None:
        """Add ``other``'s observations (same bounds) into this histogram."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count


@dataclass(slots=True)
class Stats:
    accepted: int = 0
    refused: int = 0
    messages: int = 0
    handler_errors: int = 0
    pool_restarts: int = 0
    # Bytes of connections that have closed; open ones keep their own tallies
    # (Connection.rx/tx), summed in by the server's snapshot so reads cost one increment.
    bytes_in: int = 0
    bytes_out: int = 0
    refused_per_ip: int = 0
    proxy_errors: int = 0
    tls_failures: int = 0  # handshakes that failed or timed out
    udp_datagrams: int = 0
    udp_bytes: int = 0
    # Set in snapshots only: connections open at that moment (preludes excluded).
    connections_open: int = 0
    offload_latency: LatencyBuckets = field(default_factory=LatencyBuckets)

    def copy(self) -> Stats:
        latency = self.offload_latency
        return dataclasses.replace(
            self, offload_latency=dataclasses.replace(latency, counts=list(latency.counts))
        )

    def add(self, other: Stats) -> Stats:
        """Add ``other``'s counters into these (several processes' totals); return self."""
        for f in dataclasses.fields(self):
            if f.name != "offload_latency":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.offload_latency.add(other.offload_latency)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for passing between processes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        """Raises: TypeError, KeyError: ``data`` is not :meth:`to_dict` output."""
        latency = data.get("offload_latency", {})
        fields = {k: v for k, v in data.items() if k != "offload_latency"}
        return cls(
            **fields,
            offload_latency=LatencyBuckets(
                bounds=tuple(latency.get("bounds", OFFLOAD_LATENCY_BOUNDS)),
                counts=list(latency["counts"]),
                total=float(latency["total"]),
                count=int(latency["count"]),
            ),
        )
