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


def format_ns(ns: float, short: bool = False) -> str:
    """A latency for people, in us, ms or s; ``short`` keeps three significant digits
    (axis ticks), otherwise a fixed number of decimals per unit (tables)."""
    scale, unit, decimals = next(
        (u for u in ((1e3, "us", 1), (1e6, "ms", 2)) if ns < u[0] * 1000), (1e9, "s", 3)
    )
    value = ns / scale
    return f"{value:.3g} {unit}" if short else f"{value:.{decimals}f} {unit}"


BUCKETS = bucket_index(HIGHEST_NS) + 1


def checked_bucket(index: Any) -> int:
    """A bucket number read from a file, where JSON makes it an object's key (a string).

    Raises:
        ValueError: not one of this histogram's buckets (a negative one would count from
            the end of the list, silently).
    """
    if isinstance(index, str) and index.isascii() and index.isdigit():
        index = int(index)
    i = natural(index)
    if i >= BUCKETS:
        raise ValueError(f"bucket {index!r} is out of range")
    return i


COUNT_LIMIT = 1 << 63  # past any count or nanosecond sum a run can reach


def natural(value: Any) -> int:
    """A count read from a file: a whole number, 0 or more (and below COUNT_LIMIT, so it
    still converts to a float when a rate is computed from it).

    Raises:
        ValueError, TypeError: it is not one.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int:  # not bool, not a numeric string
        raise TypeError(f"{value!r} is not a whole number")
    if not 0 <= value < COUNT_LIMIT:
        raise ValueError(f"{value!r} is out of range")
    return value


EMPTY_LOW = HIGHEST_NS + 1  # Histogram.low before the first value: above any value


class Histogram:
    """Counts of latencies in log-linear buckets, plus the exact min, max and sum.

    The counts are the record: ``total`` is their sum, computed when asked, so recording a
    value touches only its bucket, ``max``, ``low`` and ``total_ns``.  ``low`` is the
    running minimum, HIGHEST_NS + 1 while nothing is recorded; ``min`` reads it as 0 then.
    """

    __slots__ = ("counts", "low", "max", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total_ns = 0
        self.max = 0
        self.low = EMPTY_LOW

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def min(self) -> int:
        low = self.low
        return 0 if low == EMPTY_LOW else low

    def record(self, value_ns: int) -> None:
        """Record one value; negatives count as 0, values beyond 60 s as 60 s."""
        v = min(max(value_ns, 0), HIGHEST_NS)
        shift = v.bit_length() - (SUB_BITS + 1)
        self.counts[(shift << SUB_BITS) + (v >> shift) if shift > 0 else v] += 1
        if v > self.max:
            self.max = v
        if v < self.low:
            self.low = v
        self.total_ns += v

    def add(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this histogram (exact merge) and return self."""
        counts = self.counts
        for i, n in enumerate(other.counts):
            if n:
                counts[i] += n
        self.low = min(self.low, other.low)
        self.max = max(self.max, other.max)
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
        total = self.total
        if not total:
            return 0
        if q >= 100:
            return self.max
        # The rank of the smallest value with at least q% of values at or below it.
        rank = max(1, -(-total * q // 100))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return max(min(bucket_upper(i), self.max), self.min)
        return self.max

    @property
    def mean(self) -> float:
        total = self.total
        return self.total_ns / total if total else 0.0

    def curve(self) -> list[tuple[float, int]]:
        """``(percentile, upper value ns)`` for every non-empty bucket, ascending."""
        out: list[tuple[float, int]] = []
        total = self.total
        seen = 0
        for i, n in enumerate(self.counts):
            if n:
                seen += n
                out.append((100.0 * seen / total, min(bucket_upper(i), self.max)))
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
    def from_counts(cls, counts: Mapping[int, int]) -> Histogram:
        """A histogram of sparse bucket counts alone (min, max and sum from the buckets'
        upper edges): enough for percentiles over a slice of time."""
        h = cls()
        for i, n in counts.items():
            h.counts[i] += n
            upper = bucket_upper(i)
            h.max = max(h.max, upper)
            h.low = min(h.low, upper)
            h.total_ns += upper * n
        return h

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Rebuild a histogram from :meth:`to_dict` output.

        Raises:
            KeyError, ValueError, TypeError, AttributeError: ``data`` is not such output.
        """
        h = cls()
        for i, n in data["counts"].items():
            h.counts[checked_bucket(i)] += natural(n)
        h.total_ns = natural(data["total_ns"])
        h.max = natural(data["max"])
        if h.total != natural(data["total"]):
            raise ValueError("histogram counts do not add up to its total")
        if h.total:
            h.low = natural(data["min"])
            if not h.low <= h.max <= HIGHEST_NS:
                raise ValueError("histogram min and max are out of order or range")
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
