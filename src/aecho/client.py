"""``aecho client``: interactive on a terminal, a byte-exact pipe otherwise.

Plain blocking sockets: one peer, no concurrency worth an event loop.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from typing import BinaryIO

from aecho.config import ClientConfig

PROMPT = "client > "
CHUNK = 64 * 1024
REPLY_TIMEOUT_S = 10.0


class ClientError(RuntimeError):
    """A connection problem; str() is the one-line message for the user."""


def _describe(config: ClientConfig) -> str:
    if config.unix:
        return config.unix
    return (
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    )


def connect(config: ClientConfig) -> socket.socket:
    """Open the connection the configuration names.

    Raises:
        ClientError: refused, unreachable, unresolvable or timed out.
    """
    where = _describe(config)
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
    sock.settimeout(None)
    return sock


def run_pipe(config: ClientConfig, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Stream ``stdin`` to the server and its replies to ``stdout`` until the server closes.

    Raises:
        ClientError: connecting failed or the connection broke.
    """
    sock = connect(config)
    where = _describe(config)
    send_error: list[BaseException] = []

    read = getattr(stdin, "read1", stdin.read)

    def pump() -> None:
        try:
            while chunk := read(CHUNK):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)  # half-close: the server flushes and closes
        except OSError as exc:
            send_error.append(exc)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    sender = threading.Thread(target=pump, name="aecho-client-send", daemon=True)
    sender.start()
    try:
        while data := sock.recv(CHUNK):
            stdout.write(data)
        stdout.flush()
    except OSError as exc:
        raise ClientError(f"connection to {where} broke: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=1.0)
        sock.close()
    if send_error or sender.is_alive():
        raise ClientError(f"{where} closed the connection before all input was sent")


def _read_reply(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read up to and including the next newline; None when the server closed."""
    while b"\n" not in buf:
        data = sock.recv(CHUNK)
        if not data:
            return None
        buf += data
    end = buf.index(b"\n") + 1
    line = bytes(buf[:end])
    del buf[:end]
    return line


def run_interactive(config: ClientConfig) -> None:
    """Prompt, send each line, print the echo; ``quit`` or Ctrl-D ends.

    Raises:
        ClientError: connecting failed or the connection broke.
    """
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  -- importing it gives input() editing and history

    sock = connect(config)
    sock.settimeout(REPLY_TIMEOUT_S)
    where = _describe(config)
    print(f"connected to {where}; type a line, `quit` or Ctrl-D to end", file=sys.stderr)
    buf = bytearray()
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                break
            if line.strip() == "quit":
                break
            try:
                sock.sendall(line.encode("utf-8", "surrogateescape") + b"\n")
                reply = _read_reply(sock, buf)
            except TimeoutError:
                raise ClientError(f"no reply from {where} within {REPLY_TIMEOUT_S:g}s") from None
            except OSError as exc:
                raise ClientError(f"connection to {where} broke: {exc.strerror or exc}") from exc
            if reply is None:
                raise ClientError(f"{where} closed the connection")
            print(reply[:-1].decode("utf-8", "replace"), flush=True)
    finally:
        sock.close()


def run(config: ClientConfig) -> None:
    """Interactive on a terminal, pipe mode otherwise.

    Raises:
        ClientError: connecting failed or the connection broke.
    """
    if sys.stdin.isatty():
        run_interactive(config)
    else:
        run_pipe(config, sys.stdin.buffer, sys.stdout.buffer)
