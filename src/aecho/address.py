"""How an address is written in logs and messages.  Pure: no sockets, no asyncio."""

from __future__ import annotations


def format_address(address: object) -> str:
    """``host:port`` for IPv4, ``[host]:port`` for IPv6, the path for Unix sockets."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, bytes):
        return address.decode(errors="replace")
    return str(address or "unix")
