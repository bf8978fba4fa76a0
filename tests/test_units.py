"""Units as a person types them, and HOST:PORT splitting."""

from __future__ import annotations

import pytest

from aecho.address import split_host_port
from aecho.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("1.5", 1.5), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64", 64),
        ("64B", 64),
        ("1k", 1024),
        ("1KiB", 1024),
        ("64k", 65536),
        ("2MiB", 2 << 20),
        ("1M", 1 << 20),
        ("64kB", 64000),
        ("1MB", 1_000_000),
        ("1GiB", 1 << 30),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "rate"), [("50000", 50000.0), ("50k", 50000.0), ("1.5M", 1.5e6), ("200/s", 200.0)]
)
def test_rates(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("parse", "text", "forms"),
    [
        (parse_duration, "2x", "500ms, 30s, 2m"),
        (parse_duration, "", "500ms"),
        (parse_size, "1.5", "whole number"),
        (parse_size, "1q", "KiB"),
        (parse_rate, "fast", "50k"),
        (parse_duration, "inf", "500ms"),
    ],
)
def test_errors_name_the_accepted_forms(parse, text: str, forms: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=forms):
        parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7007", ("127.0.0.1", 7007)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:7007", ("::1", 7007)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("example.org", ("example.org", None)),
    ],
)
def test_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:http", "[::1", "[::1]x", "h:70000"])
def test_bad_host_port(text: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(text)
