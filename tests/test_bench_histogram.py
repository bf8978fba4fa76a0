"""The bench latency histogram: range, accuracy, exact merging."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aecho.bench.histogram import (
    BUCKETS,
    HIGHEST_NS,
    LOWEST_NS,
    Histogram,
    bucket_index,
    bucket_upper,
)

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
