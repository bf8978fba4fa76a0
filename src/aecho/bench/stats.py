"""A mergeable log-linear latency histogram.  Pure: no asyncio here.

Values are integer nanoseconds.  Below 256 ns every value has its own bucket;
above, each power of two is split into 128 equal buckets, so a bucket is never
wider than 1/128 of the values it holds and a reported percentile (the bucket's
upper edge, capped at the exact maximum) is within 0.8 % of the true value.
Recording from 1 us to 60 s takes about 3,800 integer counters.

Histograms from several connections or processes combine with :meth:`add`,
which adds counts: percentiles of the sum are exactly those of one histogram
that had seen every value.  Averaging percentiles would not be.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SUB_BITS = 7
SUB_COUNT = 1 << SUB_BITS  # buckets per power of two
LINEAR_LIMIT = 1 << (SUB_BITS + 1)  # values below this get a bucket each
LOWEST_NS = 1_000  # 1 us: the documented lower end of the range
HIGHEST_NS = 60_000_000_000  # 60 s: larger values are recorded as 60 s


def bucket_index(value: int) -> int:
    """The bucket that holds ``value`` (ns, 0 <= value <= HIGHEST_NS)."""
    shift = value.bit_length() - (SUB_BITS + 1)
    if shift <= 0:
        return value
    return (shift << SUB_BITS) + (value >> shift)


def bucket_upper(index: int) -> int:
    """The largest value that lands in bucket ``index``."""
    if index < LINEAR_LIMIT:
        return index
    shift = (index >> SUB_BITS) - 1
    sub = index - (shift << SUB_BITS)
    return ((sub + 1) << shift) - 1


BUCKETS = bucket_index(HIGHEST_NS) + 1


class Histogram:
    """Counts of latencies in log-linear buckets, plus the exact min, max and sum."""

    __slots__ = ("counts", "max", "min", "total", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total = 0
        self.total_ns = 0
        self.max = 0
        self.min = 0

    def record(self, value_ns: int) -> None:
        """Record one value; negatives count as 0, values beyond 60 s as 60 s."""
        v = min(max(value_ns, 0), HIGHEST_NS)
        shift = v.bit_length() - (SUB_BITS + 1)
        self.counts[(shift << SUB_BITS) + (v >> shift) if shift > 0 else v] += 1
        if v > self.max:
            self.max = v
        if v < self.min or not self.total:
            self.min = v
        self.total += 1
        self.total_ns += v

    def add(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this histogram (exact merge) and return self."""
        if other.total:
            counts = self.counts
            for i, n in enumerate(other.counts):
                if n:
                    counts[i] += n
            self.min = min(self.min, other.min) if self.total else other.min
            self.max = max(self.max, other.max)
            self.total += other.total
            self.total_ns += other.total_ns
        return self

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for part in parts:
            out.add(part)
        return out

    def percentile(self, q: float) -> int:
        """The value (ns) at or below which ``q`` percent of the recorded values lie.

        Returns 0 for an empty histogram.

        Raises:
            ValueError: ``q`` is outside 0..100.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        if not self.total:
            return 0
        if q >= 100:
            return self.max
        # The rank of the smallest value with at least q% of values at or below it.
        rank = max(1, -(-self.total * q // 100))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return max(min(bucket_upper(i), self.max), self.min)
        return self.max

    @property
    def mean(self) -> float:
        return self.total_ns / self.total if self.total else 0.0

    def curve(self) -> list[tuple[float, int]]:
        """``(percentile, upper value ns)`` for every non-empty bucket, ascending."""
        out: list[tuple[float, int]] = []
        seen = 0
        for i, n in enumerate(self.counts):
            if n:
                seen += n
                out.append((100.0 * seen / self.total, min(bucket_upper(i), self.max)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A compact, picklable and JSON-able form (sparse counts)."""
        return {
            "counts": {i: n for i, n in enumerate(self.counts) if n},
            "total": self.total,
            "total_ns": self.total_ns,
            "max": self.max,
            "min": self.min,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Rebuild a histogram from :meth:`to_dict` output.

        Raises:
            KeyError, ValueError, IndexError: ``data`` is not such output.
        """
        h = cls()
        for i, n in data["counts"].items():
            h.counts[int(i)] += int(n)
        h.total = int(data["total"])
        h.total_ns = int(data["total_ns"])
        h.max = int(data["max"])
        h.min = int(data["min"])
        if sum(h.counts) != h.total:
            raise ValueError("histogram counts do not add up to its total")
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            self.counts == other.counts
            and self.total == other.total
            and self.total_ns == other.total_ns
            and self.max == other.max
            and self.min == other.min
        )

    __hash__ = None  # type: ignore[assignment]
