"""PROXY protocol: the sans-IO parser (property-tested) and the server's prelude."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aecho.config import Framing, ProxyMode
from aecho.server.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeaderReader,
    could_be_header,
    encode_v1,
    encode_v2,
    parse,
)
from tests.conftest import chunked, closed_without_reply, running_server

ports = st.integers(0, 65535)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
modes = st.sampled_from([ProxyMode.v1, ProxyMode.v2, ProxyMode.auto])


# -- parser ------------------------------------------------------------------------------------


@given(endpoints, st.booleans(), st.binary(max_size=64), st.lists(st.integers(0, 300)))
def test_roundtrip_any_chunking(
    ends: tuple[tuple[str, int], tuple[str, int]], v2: bool, rest: bytes, cuts: list[int]
) -> None:
    src, dst = ends
    header = encode_v2(src, dst) if v2 else encode_v1(src, dst)
    reader = ProxyHeaderReader(ProxyMode.auto)
    result = None
    after = b""
    for piece in chunked(header + rest, cuts):
        if result is None:
            result = reader.feed(piece)
            if result is not None:
                after = reader.remainder
        else:
            after += piece  # what the real connection would get
    assert result is not None
    assert result.source == src and result.destination == dst
    assert result.version == (2 if v2 else 1)
    assert result.length == len(header)
    assert after == rest


@given(endpoints, st.booleans())
def test_every_strict_prefix_needs_more(
    ends: tuple[tuple[str, int], tuple[str, int]], v2: bool
) -> None:
    header = encode_v2(*ends) if v2 else encode_v1(*ends)
    for n in range(len(header)):
        assert parse(header[:n], ProxyMode.auto) is None


@given(st.binary(max_size=300), modes)
def test_garbage_never_crashes(data: bytes, mode: ProxyMode) -> None:
    try:
        result = parse(data, mode)
    except ProxyError:
        return
    if result is not None:
        assert 0 < result.length <= len(data)


@given(endpoints, st.booleans(), st.integers(0, 200), st.integers(1, 255))
def test_mutations_are_rejected_or_parsed(
    ends: tuple[tuple[str, int], tuple[str, int]], v2: bool, pos: int, xor: int
) -> None:
    header = bytearray(encode_v2(*ends) if v2 else encode_v1(*ends))
    header[pos % len(header)] ^= xor
    try:
        result = parse(bytes(header), ProxyMode.auto)
    except ProxyError:
        return
    assert result is None or result.length <= len(header)


@given(st.binary(min_size=1, max_size=2000))
@settings(max_examples=50)
def test_v1_line_never_buffers_past_its_limit(tail: bytes) -> None:
    data = b"PROXY " + tail.replace(b"\r", b"").replace(b"\n", b"") + b"x" * V1_MAX_LENGTH
    with pytest.raises(ProxyError):
        parse(data, ProxyMode.v1)


def test_oversized_v2_refused_from_its_fixed_header() -> None:
    head = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_PAYLOAD + 1)
    with pytest.raises(ProxyError, match="over"):
        parse(head, ProxyMode.v2)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"GET / HTTP/1.1\r\n",
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # INET block too short
        V2_SIGNATURE + b"\x21\x41\x00\x00",  # family 4
    ],
)
def test_malformed_headers(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data, ProxyMode.auto)


def test_local_unknown_and_unspec_use_real_endpoints() -> None:
    for data in (
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        encode_v2(None),
        V2_SIGNATURE + b"\x21\x00\x00\x00",
    ):
        result = parse(data + b"rest", ProxyMode.auto)
        assert result is not None and result.source is None and result.length == len(data)


def test_tlvs_are_skipped() -> None:
    tlv = b"\x05\x00\x03abc"  # PP2_TYPE_UNIQUE_ID
    result = parse(encode_v2(("10.1.2.3", 5), ("10.0.0.1", 7007), tlv) + b"x", ProxyMode.v2)
    assert result is not None and result.source == ("10.1.2.3", 5)


def test_mode_restricts_version() -> None:
    with pytest.raises(ProxyError):
        parse(encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)), ProxyMode.v2)
    with pytest.raises(ProxyError):
        parse(encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2)), ProxyMode.v1)


def test_could_be_header() -> None:
    assert could_be_header(b"PRO", ProxyMode.auto) is None
    assert could_be_header(b"PROXY TCP4", ProxyMode.auto) is True
    assert could_be_header(b"PROXIMITY", ProxyMode.auto) is False
    assert could_be_header(b"\r\n", ProxyMode.v1) is False
    assert could_be_header(b"\r\n", ProxyMode.v2) is None


# -- the server's prelude ----------------------------------------------------------------------


async def _exchange(port: int, first: bytes, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(first + payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", [Framing.raw, Framing.line])
async def test_header_then_data_in_one_chunk(framing: Framing) -> None:
    async with running_server(proxy_protocol=ProxyMode.auto, framing=framing) as server:
        for header in (
            encode_v1(("203.0.113.7", 40000), ("10.0.0.1", 7007)),
            encode_v2(("2001:db8::7", 40001), ("2001:db8::1", 7007)),
            encode_v2(None),
            b"PROXY UNKNOWN\r\n",
        ):
            assert await _exchange(server.port, header, b"hello\x00\xff\n") == b"hello\x00\xff\n"
        assert server.stats.accepted == 4
        assert server.stats.proxy_errors == 0


@pytest.mark.asyncio
async def test_header_byte_by_byte_and_real_client_address() -> None:
    async with running_server(proxy_protocol=ProxyMode.v2) as server:
        header = encode_v2(("198.51.100.9", 4242), ("10.0.0.1", 7007))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(len(header)):
            writer.write(header[i : i + 1])
            await writer.drain()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        peers = [c.peer for c in server.connections]
        assert peers == [("198.51.100.9", 4242)]
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_garbage_truncated_and_missing_headers_close_one_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("aecho.server.proxy.PROXY_HEADER_TIMEOUT", 0.3)
    async with running_server(proxy_protocol=ProxyMode.auto) as server:
        bystander_r, bystander_w = await asyncio.open_connection("127.0.0.1", server.port)
        bystander_w.write(encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)))
        assert await closed_without_reply(server.port, b"GET / HTTP/1.0\r\n\r\n")
        assert await closed_without_reply(server.port, b"PROXY " + b"9" * 200)
        assert await closed_without_reply(server.port, V2_SIGNATURE + b"\x21\x11\xff\xff")
        # Truncated: half a header, then silence until the deadline.
        assert await closed_without_reply(server.port, encode_v2(("192.0.2.1", 1), ("::1", 2))[:20])
        assert await closed_without_reply(server.port, b"")
        assert server.stats.proxy_errors == 5
        bystander_w.write(b"still here")
        assert await asyncio.wait_for(bystander_r.readexactly(10), 10) == b"still here"
        bystander_w.close()
        await bystander_w.wait_closed()


@pytest.mark.asyncio
async def test_untrusted_peer_served_plain_but_header_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("aecho.server.proxy.PROXY_HEADER_TIMEOUT", 0.3)
    async with running_server(
        proxy_protocol=ProxyMode.auto, proxy_allow_from=("10.0.0.0/8",)
    ) as server:
        assert await _exchange(server.port, b"", b"plain data") == b"plain data"
        # A prefix of a signature that turns out to be data is not lost.
        assert await _exchange(server.port, b"", b"PROXIMITY") == b"PROXIMITY"
        assert await _exchange(server.port, b"", b"PRO") == b"PRO"  # decided at the deadline
        spoof = encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2))
        assert await closed_without_reply(server.port, spoof + b"data")
        assert await closed_without_reply(server.port, encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2)))
        assert server.stats.proxy_errors == 2
        assert {c.peer[0] for c in server.connections} <= {"127.0.0.1"}


@pytest.mark.asyncio
async def test_per_ip_limit_counts_the_proxied_address() -> None:
    async with running_server(proxy_protocol=ProxyMode.v1, max_connections_per_ip=1) as server:
        opened = []
        for ip in ("192.0.2.10", "192.0.2.11"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_v1((ip, 1000), ("192.0.2.1", 7007)) + b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
            opened.append(writer)
        # Same proxy, same real client as the first: refused.
        assert await closed_without_reply(
            server.port, encode_v1(("192.0.2.10", 1001), ("192.0.2.1", 7007)) + b"x"
        )
        assert server.stats.refused_per_ip == 1
        assert server.stats.accepted == 2
        for writer in opened:
            writer.close()
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_truncated_header_then_eof_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server(proxy_protocol=ProxyMode.auto) as server:
        caplog.set_level(logging.INFO, logger="aecho.server.proxy")
        for partial in (b"PROXY TCP4 192.0.2.1", encode_v2(("192.0.2.1", 1), ("::1", 2))[:20]):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(partial)
            writer.write_eof()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
        # A peer that connects and leaves without a byte sent no header at all.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        for _ in range(100):
            if server.stats.proxy_errors >= 2:
                break
            await asyncio.sleep(0.01)
        assert server.stats.proxy_errors == 2
        assert sum("truncated PROXY header" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.asyncio
async def test_untrusted_peer_starting_like_a_signature_is_answered_at_once() -> None:
    async with running_server(
        proxy_protocol=ProxyMode.auto, proxy_allow_from=("10.0.0.0/8",)
    ) as server:
        v2_signature = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))[:12]
        # A signature alone is not a header: only a complete one in the first read is.
        for first in (
            b"\r\n", b"PRO", b"\r\n\r\n\x00", b"PROXY me a coffee\n", b"PROXY TCP4 1.2.3.4",
            v2_signature + b" bye\n",
        ):  # fmt: skip
            started = time.monotonic()
            assert await _exchange(server.port, b"", first) == first
            assert time.monotonic() - started < 1.0, f"{first!r} waited for a header"
