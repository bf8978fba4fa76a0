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


def split_host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address -> (host, port).

    The port is None when ``text`` names none.

    Raises:
        ValueError: the port is not a number from 0 to 65535, or a bracket is unbalanced.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 address with a port as [::1]:7007")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        return text, None  # a name, IPv4 address, or bare IPv6 address
    if port_text is None:
        return host, None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def host_and_port(
    host: str, port: int | None, default_host: str, default_port: int
) -> tuple[str, int]:
    """A command's HOST and PORT arguments, where HOST may carry the port itself.

    ``example.org:7007``, ``[::1]:7007`` and ``::1`` with PORT ``7007`` all work; an empty
    host (``:7007``) is the default host, as in Go's ``net.Dial``.

    Raises:
        ValueError: the port is given twice, or is not a number from 0 to 65535.
    """
    name, own_port = split_host_port(host)
    if own_port is not None and port is not None:
        raise ValueError(f"the port is given twice ({host!r} names it): leave out PORT ({port})")
    if own_port is None:
        own_port = default_port if port is None else port
    return name or default_host, own_port
