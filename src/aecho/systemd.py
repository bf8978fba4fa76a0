"""The two parts of the systemd protocol aecho speaks, without libsystemd.

* ``sd_notify``: datagrams such as ``READY=1`` to the socket named by
  ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket), so a
  ``Type=notify`` unit is "active" only once the server really serves.
* Socket activation: with ``LISTEN_PID`` equal to our pid, descriptors 3 ..
  3 + ``LISTEN_FDS`` - 1 are listening sockets the service manager bound for us.

Outside systemd both are no-ops, so callers need not check.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("aecho.systemd")

SD_LISTEN_FDS_START = 3
# sd_notify must never stall the event loop for long if the manager is slow to read.
NOTIFY_TIMEOUT_S = 2.0


class ActivationError(RuntimeError):
    """Inherited descriptors are unusable; str() is the one-line message for the operator."""


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


def listen_fds() -> list[int]:
    """The descriptors passed by socket activation (empty list when there are none).

    The ``LISTEN_*`` variables are removed from the environment, so child
    processes do not mistake descriptors they did not inherit for their own.

    Raises:
        ActivationError: ``LISTEN_FDS`` or ``LISTEN_PID`` is not a number.
    """
    pid_s = os.environ.pop("LISTEN_PID", "")
    count_s = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid_s or not count_s:
        return []
    try:
        pid, count = int(pid_s), int(count_s)
    except ValueError:
        raise ActivationError(
            f"socket activation: LISTEN_PID={pid_s!r} and LISTEN_FDS={count_s!r} must be numbers"
        ) from None
    if pid != os.getpid() or count <= 0:
        return []  # meant for another process (e.g. a wrapper that exec'd without updating it)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(
                f"socket activation: LISTEN_FDS={count} but descriptor {fd} is not open"
            ) from exc
    return fds


def listen_sockets() -> list[socket.socket]:
    """Listening stream sockets passed by socket activation, non-blocking (may be empty).

    Raises:
        ActivationError: the variables are malformed, or a descriptor is not a
            listening stream socket.
    """
    sockets: list[socket.socket] = []
    for fd in listen_fds():
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"socket activation: descriptor {fd} is not a socket") from exc
        sockets.append(sock)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.type != socket.SOCK_STREAM or not listening:
            for s in sockets:
                s.detach()  # not ours to close: leave the descriptors as they were
            raise ActivationError(
                f"socket activation: descriptor {fd} is not a listening stream socket "
                "(use ListenStream= in the .socket unit)"
            )
        sock.setblocking(False)
    return sockets
