"""Why a run went wrong, in one line a person can act on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import resource
import socket
import ssl
from typing import Any

from aecho.bench.errors import BenchError
from aecho.config import DEFAULT_HOST, DEFAULT_PORT, BenchConfig
from aecho.tls import client_context

FD_SLACK = 64  # descriptors a bench process needs besides its connections
# Errors that may mean the server is full: its connection limit or its descriptors.
FULL_SERVER_SIGNS = ("refused", "timeout", "closed")


async def diagnose(
    cfg: BenchConfig,
    errors: dict[str, int],
    replies: int,
    fds_probe: asyncio.Future[tuple[int, int, int] | None] | None,
) -> dict[str, Any]:
    """What a failing run cannot tell from its own side (see results.NOTES): the server's
    descriptors, looked at now and in ``fds_probe`` (when the first sign of a full server
    came), and whether it speaks TLS to a plain bench that got no ``replies``."""
    notes: dict[str, Any] = {}
    if any(errors[kind] for kind in FULL_SERVER_SIGNS):
        seen = [server_fds(cfg)]
        if fds_probe is not None:
            seen.append(await fds_probe)
        # The fullest reading: whether the server ran out of descriptors at some point.
        fds = max((f for f in seen if f is not None), key=lambda f: f[1], default=None)
        if fds is not None:
            notes["server_fds"] = list(fds)
    unanswered = errors["refused"] + errors["closed"] + errors["short"] + errors["reset"]
    if not cfg.tls and not cfg.unix and not replies and unanswered + errors["mismatch"]:
        host, port = cfg.host or DEFAULT_HOST, DEFAULT_PORT if cfg.port is None else cfg.port
        if await asyncio.to_thread(speaks_tls, host, port):
            notes["tls"] = True
    return notes


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
    if isinstance(
        exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError | ssl.SSLEOFError
    ):
        # Accepted, then closed before the TLS handshake could finish: how a server at its
        # connection limit turns a TLS client away, as it turns plain ones away on the
        # first message.
        return "refused", "the server closed the connection during the TLS handshake"
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


def ensure_fd_limit(connections: int, total: int, workers: int) -> None:
    """Raise the soft descriptor limit if this process needs more; fail if it cannot.

    Raises:
        BenchError: the hard limit is too low for ``connections`` sockets.
    """
    need = connections + FD_SLACK
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
    more = " or spread them over more --workers" if workers < total else ""
    raise BenchError(
        f"-c {total} needs about {need} file descriptors per process but the limit is "
        f"{soft} (hard {hard}): raise it with 'ulimit -n {need}' (as root, or "
        f"LimitNOFILE= for a service){more}"
    )


# -- the server's side, when it runs on this machine -----------------------------------------------

LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp
UNIX_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix


def _listening_inodes(cfg: BenchConfig) -> set[str]:
    """Socket inodes listening on the target, when the target is on this machine."""
    inodes: set[str] = set()
    if cfg.unix:
        with contextlib.suppress(OSError), open("/proc/net/unix", encoding="ascii") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                accepting = len(fields) >= 8 and int(fields[3], 16) & UNIX_ACCEPTING
                if accepting and fields[7] == os.path.abspath(cfg.unix):
                    inodes.add(fields[6])
        return inodes
    if not _is_loopback(cfg.host or DEFAULT_HOST) or cfg.port is None:
        return inodes  # a port number on another machine says nothing about this one
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == LISTEN_STATE and int(local.rsplit(":", 1)[1], 16) == cfg.port:
                    inodes.add(inode)
    return inodes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_fds(cfg: BenchConfig) -> tuple[int, int, int] | None:
    """(pid, open descriptors, soft descriptor limit) of the process serving the target,
    when it runs on this machine and may be looked at; None otherwise."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(cfg)}
    if not wanted:
        return None
    best: tuple[int, int, int] | None = None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if not any(os.readlink(f"/proc/{entry}/fd/{fd}") in wanted for fd in fds):
                continue
            limit = _soft_fd_limit(int(entry))
        except OSError:
            continue  # gone, or not ours to look at
        if best is None or len(fds) > best[1]:
            best = (int(entry), len(fds), limit)
    return best


def _soft_fd_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of ``pid`` (-1: unlimited).

    Raises:
        OSError: the process is gone or its limits cannot be read.
    """
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line[len("Max open files") :].split()[0]
                return -1 if soft == "unlimited" else int(soft)
    raise OSError(f"no descriptor limit for pid {pid}")


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a TLS handshake with HOST:PORT succeeds (certificate not checked)."""
    ctx = client_context(insecure=True)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False
