"""``sd_notify``, both ends, without libsystemd.

Datagrams such as ``READY=1`` go to the socket named by ``NOTIFY_SOCKET`` (a path,
or ``@name`` for an abstract socket), so a ``Type=notify`` unit is "active" only
once the server really serves.  Outside systemd this is a no-op, so callers need
not check.  (Socket activation, the other half of the protocol, is in
``server.listeners``: it runs before any process decision is made.)

The other end of ``sd_notify`` is here too (:class:`NotifyReceiver`): whoever starts
``aecho serve`` and must know when it serves, and where (bench's embedded server, the
tests, the benchmarks), makes a private notify socket and waits for ``READY=1``, exactly
as systemd does.  READY carries ``X_AECHO_LISTEN`` (the sd_notify convention for custom
fields is an ``X_`` prefix): the bound addresses, so ``--port 0`` needs no log parsing.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("aecho.systemd")

# The custom READY field that lists the addresses a server listens on, space-separated.
LISTEN_FIELD = "X_AECHO_LISTEN"
# sd_notify must never stall the event loop for long if the manager is slow to read.
NOTIFY_TIMEOUT_S = 2.0


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``.

    Returns True when a datagram was sent; False when there is no notify socket
    or it cannot be reached (logged at debug level: the service keeps running).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r: only Unix socket paths are supported", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("cannot notify the service manager (%s): %s", state, exc)
        return False
    return True


# -- the receiving end -------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int] | str:
    """``host:port`` or ``[v6]:port`` as ``(host, port)``; anything else is a Unix path."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]"), int(port)
    return text


@dataclass(frozen=True)
class Notification:
    """One ``sd_notify`` datagram: its sender (when the kernel told us) and its fields."""

    pid: int | None
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def addresses(self) -> list[tuple[str, int] | str]:
        """What READY said the server listens on (``X_AECHO_LISTEN``)."""
        return [parse_address(a) for a in self.fields.get(LISTEN_FIELD, "").split()]

    @property
    def port(self) -> int:
        """The first TCP port among :attr:`addresses`.

        Raises:
            LookupError: no TCP address was announced.
        """
        for addr in self.addresses:
            if isinstance(addr, tuple):
                return addr[1]
        raise LookupError("no TCP address in the READY notification")


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyReceiver:
    """A private ``NOTIFY_SOCKET``: a datagram socket in the abstract namespace (named
    ``@aecho-notify-<random>``), so nothing is left on disk even when its owner is killed.

    Pass :attr:`env` to the child; :meth:`wait_ready` returns its READY notification.
    """

    def __init__(self) -> None:
        self.path = f"@aecho-notify-{secrets.token_hex(12)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind("\0" + self.path[1:])
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except BaseException:
            self.close()
            raise

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, timeout: float | None) -> Notification | None:
        """The next datagram, or None when none arrived within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        except (TimeoutError, BlockingIOError):
            return None
        pid: int | None = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        return Notification(pid, fields)

    def wait_ready(
        self, timeout: float, exited: Callable[[], bool] = lambda: False
    ) -> Notification | None:
        """The first READY notification within ``timeout``; None if ``exited()`` turns true
        first or time runs out."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if exited():
                return None
            note = self.receive(min(remaining, 0.1))
            if note is not None and note.ready:
                return note
        return None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
