"""Why a run went wrong, in one line a person can act on."""

from __future__ import annotations

import errno
import resource
import socket
import ssl

from aecho.config import BenchConfig


def connect_error(cfg: BenchConfig, exc: BaseException) -> tuple[str, str]:
    """(kind, one-line message) for a failed connect."""
    target = cfg.target
    if isinstance(exc, ConnectionRefusedError) or (isinstance(exc, FileNotFoundError) and cfg.unix):
        return (
            "connect",
            f"nothing is listening on {target}: start 'aecho serve' or check the address",
        )
    if isinstance(exc, TimeoutError):
        return "connect", f"connecting to {target} timed out after {cfg.timeout:g}s"
    if isinstance(exc, ssl.SSLError):
        return "connect", f"TLS handshake with {target} failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            return "connect", (
                f"out of file descriptors (limit {soft}): raise it with 'ulimit -n', "
                "or use fewer connections per --workers"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return "connect", (
                f"out of local ports for connections to {target}: use fewer connections "
                "(see net.ipv4.ip_local_port_range)"
            )
        if isinstance(exc, socket.gaierror):
            return "connect", f"cannot resolve {cfg.host!r}: {exc.strerror}"
        return "connect", f"cannot connect to {target}: {exc.strerror or exc}"
    return "connect", f"cannot connect to {target}: {exc}"
