"""Listening sockets, made before any event loop exists: bound here, or adopted from systemd.

Synchronous on purpose: a daemon binds in the foreground, so a busy port or a bad
address reaches the operator's terminal, and only then detaches and starts its loop.
Socket activation: with ``LISTEN_PID`` equal to our pid, descriptors 3 ..
3 + ``LISTEN_FDS`` - 1 are listening sockets the service manager bound for us.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from aecho.address import format_address
from aecho.config import DEFAULT_UNIX_MODE, ServerConfig

SD_LISTEN_FDS_START = 3


class StartupError(RuntimeError):
    """The server cannot start; str() is the one-line message for the operator."""


def bind_error(where: str, exc: OSError, option: str = "--port") -> StartupError:
    """The one line for a listener that cannot bind; ``option`` is the one that chose it."""
    another = "--port, or --port 0 for any free port" if option == "--port" else option
    hints = {
        errno.EADDRINUSE: "address already in use: is another server on that port? "
        f"Choose another {another}",
        errno.EADDRNOTAVAIL: "address not available on this machine: check --host",
        errno.EACCES: f"permission denied: ports below 1024 need privileges; use a higher {option}",
    }
    reason = hints.get(exc.errno or 0, exc.strerror or str(exc))
    return StartupError(f"cannot listen on {where}: {reason}")


def _unix_bind_error(path: str, exc: OSError) -> StartupError:
    directory = os.path.dirname(os.path.abspath(path))
    if exc.errno == errno.ENOENT and not os.path.isdir(directory):
        reason = f"directory {directory} does not exist"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        reason = f"cannot create a socket in {directory}: {exc.strerror}"
    elif exc.errno is None and "too long" in str(exc):
        reason = "path too long for a Unix socket (at most 107 bytes)"
    else:
        reason = exc.strerror or str(exc)
    return StartupError(f"cannot listen on {path}: {reason}; choose another --unix path")


def nothing_listens(path: str) -> bool:
    """Whether a connection to the Unix socket file at ``path`` fails (a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return True
    return False


def _bind_unix(path: str, backlog: int, mode: int = DEFAULT_UNIX_MODE) -> socket.socket:
    """A listening Unix socket at ``path``; a stale socket file there is replaced.

    Raises:
        StartupError: something else is at the path, a server listens there, or the
            bind fails.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise StartupError(
                f"cannot listen on {path}: it exists and is not a socket; "
                "remove it or choose another --unix path"
            )
        if not nothing_listens(path):
            raise StartupError(f"cannot listen on {path}: a server is already listening there")
        os.unlink(path)  # stale: nothing listens there any more
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): no peer can connect while the mode is still the umask's.
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _unix_bind_error(path, exc) from exc
    sock.setblocking(False)
    return sock


def bind_listeners(
    config: ServerConfig, reuse_port: bool = False, _attempt: int = 0
) -> list[socket.socket]:
    """Create, bind and listen on every socket the configuration asks for.

    A host name that resolves to several addresses gets one listener each; with
    ``--port 0`` they all share the port the first one was given.  ``--udp``
    adds a UDP socket on each TCP listener's address and port.  With
    ``reuse_port`` the TCP listeners take SO_REUSEPORT, so that :func:`bind_sibling`
    can add more listeners on the same address for other serving processes.

    Raises:
        StartupError: the host does not resolve, or a bind or listen fails.
    """
    backlog = config.effective_backlog
    if config.unix:
        return [_bind_unix(config.unix, backlog, config.unix_mode)]
    try:
        infos = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {config.host!r}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    port = config.port
    try:
        for family, type_, proto, _, addr in infos:
            key = (family, addr[0])
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            where = format_address((addr[0], port))
            try:
                if reuse_port:
                    _check_unused(family, type_, proto, (addr[0], port, *addr[2:]))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((addr[0], port, *addr[2:]))
                sock.listen(backlog)
            except OSError as exc:
                raise bind_error(where, exc) from exc
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if config.udp:
        try:
            sockets += _bind_udp_twins(sockets)
        except StartupError:
            for sock in sockets:
                sock.close()
            if config.port == 0 and _attempt < 5:
                # The free TCP port was taken for UDP: pick another pair.
                return bind_listeners(config, reuse_port, _attempt + 1)
            raise
    return sockets


def _check_unused(family: int, type_: int, proto: int, address: tuple[object, ...]) -> None:
    """Fail if anything listens on ``address`` (port 0 always passes).

    Any process of the same user could join a SO_REUSEPORT group and silently share
    the port with another server; a plain bind first makes a busy port an error,
    as it is without SO_REUSEPORT.

    Raises:
        OSError: the address is in use (or cannot be bound).
    """
    if address[1] == 0:
        return
    with socket.socket(family, type_, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)


def bind_sibling(sock: socket.socket, backlog: int) -> socket.socket:
    """Another SO_REUSEPORT listener on ``sock``'s address: the kernel spreads new
    connections over the group.

    Raises:
        StartupError: the bind or listen failed.
    """
    sibling = socket.socket(sock.family, sock.type, sock.proto)
    address = sock.getsockname()
    try:
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            sibling.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sibling.bind(address)
        sibling.listen(backlog)
    except OSError as exc:
        sibling.close()
        raise bind_error(format_address(address), exc) from exc
    sibling.setblocking(False)
    return sibling


def reuses_port(sock: socket.socket) -> bool:
    return sock.type == socket.SOCK_STREAM and bool(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    )


def _bind_udp_twins(tcp_sockets: list[socket.socket]) -> list[socket.socket]:
    """A UDP socket on the address and port of each TCP listener.

    Raises:
        StartupError: a bind failed (all UDP sockets made so far are closed).
    """
    from aecho.server.udp import bind_udp

    made: list[socket.socket] = []
    for tcp in tcp_sockets:
        addr = tcp.getsockname()
        try:
            made.append(bind_udp(tcp.family, addr))
        except OSError as exc:
            for sock in made:
                sock.close()
            raise bind_error(f"udp {format_address(addr)}", exc) from exc
    return made


def listen_fds() -> list[int]:
    """The descriptors passed by socket activation (empty list when there are none).

    The ``LISTEN_*`` variables are removed from the environment, so child
    processes do not mistake descriptors they did not inherit for their own.

    Raises:
        StartupError: ``LISTEN_FDS`` or ``LISTEN_PID`` is not a number.
    """
    pid_s = os.environ.pop("LISTEN_PID", "")
    count_s = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid_s or not count_s:
        return []
    try:
        pid, count = int(pid_s), int(count_s)
    except ValueError:
        raise StartupError(
            f"socket activation: LISTEN_PID={pid_s!r} and LISTEN_FDS={count_s!r} must be numbers"
        ) from None
    if pid != os.getpid() or count <= 0:
        return []  # meant for another process (e.g. a wrapper that exec'd without updating it)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise StartupError(
                f"socket activation: LISTEN_FDS={count} but descriptor {fd} is not open"
            ) from exc
    return fds


def listen_sockets(udp: bool = False) -> list[socket.socket]:
    """Sockets passed by socket activation, non-blocking (may be empty): listening
    stream sockets, and with ``udp`` also datagram sockets (``ListenDatagram=``).

    Raises:
        StartupError: the variables are malformed, or a descriptor is not a
            socket of a kind that may be served.
    """
    sockets: list[socket.socket] = []
    for fd in listen_fds():
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartupError(f"socket activation: descriptor {fd} is not a socket") from exc
        sockets.append(sock)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        served = (sock.type == socket.SOCK_STREAM and listening) or (
            udp and sock.type == socket.SOCK_DGRAM
        )
        if not served:
            for s in sockets:
                s.detach()  # not ours to close: leave the descriptors as they were
            raise StartupError(
                f"socket activation: descriptor {fd} is not a listening stream socket "
                "(use ListenStream= in the .socket unit, or ListenDatagram= with --udp)"
            )
        sock.setblocking(False)
    return sockets


def open_listeners(config: ServerConfig, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets passed by systemd socket activation, else freshly bound ones.

    With ``--udp`` under activation, datagram sockets passed are answered; when none
    is passed, UDP is bound on each activated TCP listener's address and port, as it
    would be without activation.

    Raises:
        StartupError: binding failed, or the inherited descriptors are unusable.
    """
    inherited = listen_sockets(udp=config.udp)
    if not inherited:
        return bind_listeners(config, reuse_port)
    if config.udp and not any(s.type == socket.SOCK_DGRAM for s in inherited):
        tcp = [s for s in inherited if s.family in (socket.AF_INET, socket.AF_INET6)]
        if not tcp:
            raise StartupError(
                "socket activation: --udp needs a TCP listener or a ListenDatagram= socket"
            )
        inherited += _bind_udp_twins(tcp)
    return inherited
