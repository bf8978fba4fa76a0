"""The bench latency histogram: range, accuracy, exact merging."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aecho.bench import connection
from aecho.bench.connection import BenchConn, Tally
from aecho.bench.histogram import (
    BUCKETS,
    HIGHEST_NS,
    LOWEST_NS,
    Histogram,
    bucket_index,
    bucket_upper,
)
from aecho.config import BenchConfig

values = st.integers(min_value=LOWEST_NS, max_value=HIGHEST_NS)


@given(values)
def test_bucket_holds_value_within_one_percent(v: int) -> None:
    i = bucket_index(v)
    assert 0 <= i < BUCKETS
    upper = bucket_upper(i)
    assert v <= upper
    assert i == 0 or bucket_upper(i - 1) < v
    assert (upper - v) / v <= 0.01


def test_buckets_are_contiguous() -> None:
    for i in range(1, BUCKETS):
        assert bucket_index(bucket_upper(i - 1) + 1) == i


@given(st.lists(values, min_size=1, max_size=300), st.sampled_from([50, 90, 99, 99.9]))
def test_percentile_within_one_percent_of_exact(data: list[int], q: float) -> None:
    h = Histogram()
    for v in data:
        h.record(v)
    ordered = sorted(data)
    rank = max(1, -(-len(data) * q // 100))
    exact = ordered[int(rank) - 1]
    got = h.percentile(q)
    assert exact <= got <= exact * 1.01
    assert h.percentile(100) == h.max == max(data)
    assert h.min == min(data)


def test_out_of_range_values_are_clamped() -> None:
    h = Histogram()
    h.record(-5)
    h.record(10 * HIGHEST_NS)
    assert h.min == 0
    assert h.max == HIGHEST_NS
    assert h.total == 2


@given(st.lists(values, max_size=200), st.lists(values, max_size=200))
def test_merge_is_exact(a: list[int], b: list[int]) -> None:
    ha, hb, hall = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.record(v)
        hall.record(v)
    for v in b:
        hb.record(v)
        hall.record(v)
    merged = Histogram.merged([ha, hb])
    assert merged == hall
    for q in (50, 90, 99, 99.9, 100):
        assert merged.percentile(q) == hall.percentile(q)


def test_dict_round_trip() -> None:
    rng = random.Random(5)
    h = Histogram()
    for _ in range(1000):
        h.record(int(rng.lognormvariate(12, 2)))
    assert Histogram.from_dict(h.to_dict()) == h


def test_bad_percentile_and_bad_dict() -> None:
    h = Histogram()
    assert h.percentile(99) == 0
    with pytest.raises(ValueError):
        h.percentile(101)
    bad = h.to_dict() | {"total": 3}
    with pytest.raises(ValueError):
        Histogram.from_dict(bad)


# Every edge of the bucket layout: the linear range, its end, each power of two and its
# neighbours, the 60 s cap and beyond it.
EDGES = sorted(
    {0, 1, 255, 256, 257, HIGHEST_NS - 1, HIGHEST_NS, HIGHEST_NS + 1, 10 * HIGHEST_NS}
    | {(1 << k) + d for k in range(1, 37) for d in (-1, 0, 1)}
)


def inlined(values: list[int], monkeypatch: pytest.MonkeyPatch) -> Histogram:
    """``values`` recorded by BenchConn.data_received's inlined path, as replies that were
    due that long ago."""
    cfg = BenchConfig(host="127.0.0.1", port=1, size=64).validate()
    tally = Tally(cfg)
    tally.fast_from = 0  # measuring: the inlined path applies
    tally.call_soon = lambda callback: None  # the next messages are not written
    conn = BenchConn(tally, 0)
    conn.write = lambda payload: None
    now = 20 * HIGHEST_NS  # later than any message could have been due
    monkeypatch.setattr(connection, "monotonic_ns", lambda: now)
    for value in values:
        reply = b"x" * 64
        conn.out.clear()
        conn.out.append((reply, now - value))
        conn.data_received(reply)
    assert conn.seq == len(values)  # each reply took the inlined path and sent the next
    return tally.hist


def recorded(values: list[int]) -> Histogram:
    h = Histogram()
    for value in values:
        h.record(value)
    return h


def test_the_inlined_record_agrees_with_histogram_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """BenchConn.data_received records closed-loop echo latencies with Histogram.record's
    code inlined (a call per message costs); both must fill the same buckets, with the same
    minimum, maximum and sum: for each edge alone, and for all of them together."""
    for value in EDGES:
        alone, reference = inlined([value], monkeypatch), recorded([value])
        assert alone.counts == reference.counts, value
        assert (alone.min, alone.max, alone.total_ns) == (
            reference.min,
            reference.max,
            reference.total_ns,
        ), value
    assert inlined(EDGES, monkeypatch) == recorded(EDGES)
