"""Sans-IO framers under arbitrary chunkings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aecho.server.framing import FrameError, LineFramer, RawFramer
from tests.conftest import chunked


@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0), max_size=30))
def test_raw_framer_passes_every_byte(data: bytes, cuts: list[int]) -> None:
    framer = RawFramer()
    out = b"".join(b"".join(framer.feed(chunk)) for chunk in chunked(data, cuts))
    assert out == data
    assert framer.feed(b"") == []


lines_strategy = st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), max_size=40)


@given(lines_strategy, st.lists(st.integers(min_value=0), max_size=30))
def test_line_framer_yields_the_lines_whatever_the_chunking(
    lines: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    framer = LineFramer(max_line=60)
    got: list[bytes] = []
    for chunk in chunked(stream, cuts):
        got.extend(framer.feed(chunk))
    assert got == lines
    assert framer.pending == 0


@given(st.integers(min_value=1, max_value=50), st.lists(st.integers(min_value=0), max_size=10))
def test_line_framer_refuses_a_line_over_the_limit(limit: int, cuts: list[int]) -> None:
    stream = b"x" * (limit + 1) + b"\n"
    framer = LineFramer(max_line=limit)
    with pytest.raises(FrameError, match=f"limit is {limit} bytes"):
        for chunk in chunked(stream, cuts):
            framer.feed(chunk)


def test_line_framer_accepts_a_line_of_exactly_the_limit() -> None:
    framer = LineFramer(max_line=5)
    assert framer.feed(b"abc") == []
    assert framer.feed(b"de\nxy") == [b"abcde"]
    assert framer.pending == 2
    assert framer.encode(b"r") == b"r\n"


def test_unterminated_tail_over_the_limit_is_refused_before_the_newline() -> None:
    framer = LineFramer(max_line=4)
    assert framer.feed(b"ok\n1234") == [b"ok"]
    with pytest.raises(FrameError):
        framer.feed(b"5")


def test_lines_before_an_overlong_one_travel_with_the_error() -> None:
    framer = LineFramer(max_line=3)
    with pytest.raises(FrameError) as info:
        framer.feed(b"a\nbc\ntoolong\nz\n")
    assert info.value.messages == [b"a", b"bc"]


def test_a_long_line_in_small_pieces() -> None:
    framer = LineFramer(max_line=4 << 20)
    piece = bytes(range(256)).replace(b"\n", b"") * 4
    for _ in range(4000):
        assert framer.feed(piece) == []
    assert framer.pending == 4000 * len(piece)
    [line] = framer.feed(b"\n")
    assert line == piece * 4000
    assert framer.pending == 0
