"""The client's connection: connecting, TLS, and the errors a user sees."""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import BinaryIO

from aecho.address import format_address
from aecho.config import ClientConfig

CHUNK = 64 * 1024


class ClientError(RuntimeError):
    """A connection problem; str() is the one-line message for the user."""


class OutputClosed(Exception):
    """Whoever reads stdout has gone (EPIPE): not a network failure, nothing to report."""


def describe(config: ClientConfig) -> str:
    return config.unix or format_address((config.host, config.port))


def no_reply(where: str, timeout: float) -> ClientError:
    return ClientError(
        f"no reply from {where} within {timeout:g}s of the last byte sent "
        "(--timeout sets how long; 0 waits forever)"
    )


def broke(where: str, exc: OSError) -> ClientError:
    return ClientError(f"connection to {where} broke: {exc.strerror or exc}")


def closed(where: str) -> ClientError:
    return ClientError(f"server closed the connection ({where})")


def cut_short(where: str) -> ClientError:
    return ClientError(f"server closed the connection before the end of input ({where})")


def write_out(stdout: BinaryIO, data: bytes) -> None:
    """Write ``data`` to stdout now (a reader downstream may be waiting on it).

    Raises:
        OutputClosed: the reader closed the pipe.
        ClientError: stdout cannot be written (a full disk, say).
    """
    try:
        stdout.write(data)
        stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None
    except OSError as exc:
        raise ClientError(f"cannot write the replies to stdout: {exc.strerror or exc}") from exc


def connect(config: ClientConfig) -> socket.socket:
    """Open the connection the configuration names.

    Raises:
        ClientError: refused, unreachable, unresolvable or timed out.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded (with TLS).
    """
    where = describe(config)
    try:
        if config.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(config.connect_timeout)
            try:
                sock.connect(config.unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((config.host, config.port), config.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except socket.gaierror as exc:
        raise ClientError(f"cannot resolve {config.host!r}: {exc.strerror}") from exc
    except ConnectionRefusedError as exc:
        raise ClientError(
            f"cannot connect to {where}: connection refused (is `aecho serve` running there?)"
        ) from exc
    except FileNotFoundError as exc:
        raise ClientError(f"cannot connect to {where}: no such socket file") from exc
    except TimeoutError as exc:
        raise ClientError(
            f"cannot connect to {where}: timed out after {config.connect_timeout:g}s "
            "(host down or filtered? try --connect-timeout)"
        ) from exc
    except OSError as exc:
        raise ClientError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    if config.tls:
        sock = _wrap_tls(sock, config, where)
    sock.settimeout(None)
    return sock


def handshake_timed_out(where: str) -> ClientError:
    return ClientError(f"TLS handshake with {where} timed out (is it a TLS server?)")


def _wrap_tls(sock: socket.socket, config: ClientConfig, where: str) -> ssl.SSLSocket:
    """Run the TLS handshake on a connected socket.

    Raises:
        ClientError: the handshake failed or timed out.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded.
    """
    from aecho.tls import client_context, describe_handshake_error

    try:
        ctx = client_context(config.cafile, config.insecure)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(config.connect_timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=config.host)
    except ssl.SSLError as exc:
        raise ClientError(describe_handshake_error(where, exc)) from exc
    except TimeoutError as exc:
        raise handshake_timed_out(where) from exc
    except OSError as exc:
        raise ClientError(f"TLS handshake with {where} failed: {exc.strerror or exc}") from exc
    finally:
        sock.close()  # detached by wrap_socket on success; closes it on failure


# -- pipe mode -----------------------------------------------------------------------------------


class Plain:
    """The bytes on the wire are the bytes of the stream; end of input is a half-close."""

    ready = True

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._out = bytearray()

    def handshake(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._out += data

    def outgoing(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def finish(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)  # the server flushes its replies and closes

    def received(self, data: bytes) -> tuple[bytes, bool]:
        return data, not data


class Tls:
    """TLS in memory (``wrap_bio``), driven by the one thread that owns the socket.

    One SSL object must not be driven from two threads, and a TLS stream cannot half-close:
    end of input is a close_notify, which the server takes as end of input.
    """

    def __init__(self, config: ClientConfig, where: str) -> None:
        """Raises: aecho.config.ConfigError: ``--cafile`` cannot be loaded."""
        from aecho.tls import client_context

        self._where = where
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = client_context(config.cafile, config.insecure)
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=config.host)
        self.ready = False

    def handshake(self) -> None:
        """Raises: ClientError: the server's certificate or protocol was refused."""
        from aecho.tls import describe_handshake_error

        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            raise ClientError(describe_handshake_error(self._where, exc)) from exc
        self.ready = True

    def write(self, data: bytes) -> None:
        self._tls.write(data)

    def outgoing(self) -> bytes:
        return self._out.read()

    def finish(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self._tls.unwrap()

    def received(self, data: bytes) -> tuple[bytes, bool]:
        """Bytes from the socket in, the stream's bytes out, and whether the stream ended.

        Raises:
            ClientError: the handshake failed or the TLS stream is corrupt.
        """
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        if not self.ready:
            self.handshake()
            if not self.ready:
                return b"", False
        out = bytearray()
        try:
            while chunk := self._tls.read(CHUNK):
                out += chunk
        except ssl.SSLWantReadError:
            return bytes(out), False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            pass
        except ssl.SSLError as exc:
            raise ClientError(f"TLS error from {self._where}: {exc.reason or exc}") from exc
        return bytes(out), True  # an empty read is the server's close_notify
