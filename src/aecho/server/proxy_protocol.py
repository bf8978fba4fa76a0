"""Sans-IO PROXY protocol (v1 text and v2 binary) header parser.  No asyncio here.

A load balancer such as HAProxy prepends one header to each connection that
names the original client.  :class:`ProxyHeaderReader` takes the connection's
first bytes in chunks of any size and yields the header once it is complete,
with the bytes that followed it; :func:`parse` is the same on one buffer.

Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from aecho.config import ProxyMode

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The longest v1 line the specification allows, CRLF included.
V1_MAX_LENGTH = 107
V2_HEADER_LENGTH = 16
# The v2 length field allows 64 KiB; real headers (addresses plus a few TLVs)
# are far smaller, and a peer must not make us buffer that much before it has
# said anything useful.
V2_MAX_PAYLOAD = 4096

_V2_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36, 0x3: 216}


class ProxyError(ValueError):
    """The bytes are not an acceptable PROXY header; str() says why."""


Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header.

    ``source`` and ``destination`` are None when the header says to use the
    connection's real endpoints: v1 ``UNKNOWN``, v2 ``LOCAL`` (health checks),
    or a v2 address family this server does not route (UNSPEC, UNIX).
    """

    version: int
    source: Address | None
    destination: Address | None
    length: int


def signatures(mode: ProxyMode) -> tuple[bytes, ...]:
    """The header signatures ``mode`` accepts (none for ``off``)."""
    if mode is ProxyMode.v1:
        return (V1_PREFIX,)
    if mode is ProxyMode.v2:
        return (V2_SIGNATURE,)
    if mode is ProxyMode.auto:
        return (V1_PREFIX, V2_SIGNATURE)
    return ()


def parse(buf: bytes, mode: ProxyMode = ProxyMode.auto) -> ProxyHeader | None:
    """Parse a header at the start of ``buf``; None when more bytes are needed.

    Raises:
        ProxyError: ``buf`` cannot be the start of a header ``mode`` accepts, or
            the header is malformed or too long.
    """
    for sig in signatures(mode):
        n = min(len(buf), len(sig))
        if buf[:n] == sig[:n]:
            if n < len(sig):
                return None  # a prefix of a signature: wait for more
            return _parse_v1(buf) if sig is V1_PREFIX else _parse_v2(buf)
    raise ProxyError(f"no PROXY protocol header (expected {mode.value})")


def _parse_port(text: bytes) -> int:
    if not (1 <= len(text) <= 5 and text.isdigit()) or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyError(f"bad port {text[:8]!r} in PROXY v1 header")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range in PROXY v1 header")
    return port


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(buf) >= V1_MAX_LENGTH:
            raise ProxyError(f"PROXY v1 header longer than {V1_MAX_LENGTH} bytes")
        if b"\n" in buf or (b"\r" in buf[:-1]):
            raise ProxyError("PROXY v1 header not terminated by CRLF")
        return None
    line = buf[:end]
    length = end + 2
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, None, length)
    if len(parts) != 6:
        raise ProxyError("malformed PROXY v1 header")
    _, proto, src, dst, sport, dport = parts
    cls: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    if proto == b"TCP4":
        cls = ipaddress.IPv4Address
    elif proto == b"TCP6":
        cls = ipaddress.IPv6Address
    else:
        raise ProxyError(f"unknown PROXY v1 protocol {proto[:8]!r}")
    try:
        src_ip = cls(src.decode("ascii"))
        dst_ip = cls(dst.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProxyError("bad address in PROXY v1 header") from exc
    return ProxyHeader(
        1, (str(src_ip), _parse_port(sport)), (str(dst_ip), _parse_port(dport)), length
    )


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    if len(buf) < V2_HEADER_LENGTH:
        return None
    ver_cmd, fam_proto, payload_len = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"unsupported PROXY v2 version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyError(f"unknown PROXY v2 command {command}")
    if payload_len > V2_MAX_PAYLOAD:
        raise ProxyError(f"PROXY v2 header of {payload_len} bytes is over {V2_MAX_PAYLOAD}")
    length = V2_HEADER_LENGTH + payload_len
    if len(buf) < length:
        return None
    family, transport = fam_proto >> 4, fam_proto & 0x0F
    if family > 3 or transport > 2:
        raise ProxyError(f"unknown PROXY v2 address family 0x{fam_proto:02x}")
    if command == 0:  # LOCAL: the proxy speaking for itself (health checks)
        return ProxyHeader(2, None, None, length)
    need = _V2_ADDRESS_LENGTHS.get(family, 0)
    if payload_len < need:
        raise ProxyError("PROXY v2 address block shorter than its family needs")
    if family == 0x1:
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", buf, V2_HEADER_LENGTH)
        return ProxyHeader(
            2,
            (str(ipaddress.IPv4Address(src4)), sport),
            (str(ipaddress.IPv4Address(dst4)), dport),
            length,
        )
    if family == 0x2:
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", buf, V2_HEADER_LENGTH)
        return ProxyHeader(
            2,
            (str(ipaddress.IPv6Address(src6)), sport),
            (str(ipaddress.IPv6Address(dst6)), dport),
            length,
        )
    # UNSPEC or UNIX: nothing an IP limit can use; the real endpoints stand.
    return ProxyHeader(2, None, None, length)


class ProxyHeaderReader:
    """Accumulates a connection's first bytes until a whole header is there."""

    __slots__ = ("_buf", "mode", "remainder")

    def __init__(self, mode: ProxyMode) -> None:
        self.mode = mode
        self._buf = b""
        self.remainder = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data``; the header once complete (``remainder`` then holds what followed).

        Raises:
            ProxyError: the bytes cannot be (or are not) an acceptable header.
        """
        self._buf += data
        header = parse(self._buf, self.mode)
        if header is not None:
            self.remainder = self._buf[header.length :]
            self._buf = b""
        return header


def could_be_header(buf: bytes, mode: ProxyMode) -> bool | None:
    """Whether ``buf`` starts with a header signature: True, False, or None (too short to tell)."""
    undecided = False
    for sig in signatures(mode):
        n = min(len(buf), len(sig))
        if buf[:n] == sig[:n]:
            if n == len(sig):
                return True
            undecided = True
    return None if undecided else False


def encode_v1(source: Address | None, destination: Address | None = None) -> bytes:
    """A v1 header line (``UNKNOWN`` when ``source`` is None)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(
    source: Address | None, destination: Address | None = None, tlvs: bytes = b""
) -> bytes:
    """A v2 header (``LOCAL`` when ``source`` is None), with optional raw TLV bytes."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block
