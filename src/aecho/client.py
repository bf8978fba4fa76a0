"""``aecho client``: interactive on a terminal, a byte-exact pipe otherwise.

Plain blocking sockets: one peer, no concurrency worth an event loop.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import ssl
import sys
import threading
from dataclasses import replace
from typing import BinaryIO

from aecho.address import format_address
from aecho.config import ClientConfig

PROMPT = "client > "
CHUNK = 64 * 1024
REPLY_TIMEOUT_S = 10.0


class ClientError(RuntimeError):
    """A connection problem; str() is the one-line message for the user."""


def _describe(config: ClientConfig) -> str:
    return config.unix or format_address((config.host, config.port))


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
    if config.tls:
        sock = _wrap_tls(sock, config, where)
    sock.settimeout(None)
    return sock


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
        raise ClientError(f"TLS handshake with {where} timed out (is it a TLS server?)") from exc
    except OSError as exc:
        raise ClientError(f"TLS handshake with {where} failed: {exc.strerror or exc}") from exc
    finally:
        sock.close()  # detached by wrap_socket on success; closes it on failure


def run_pipe(config: ClientConfig, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Stream ``stdin`` to the server and its replies to ``stdout`` until the server closes.

    Raises:
        ClientError: connecting failed or the connection broke.
    """
    if config.tls:
        run_pipe_tls(config, stdin, stdout)
        return
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


def run_pipe_tls(config: ClientConfig, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Pipe mode over TLS: stdin to the server, replies to stdout, until the server closes.

    A TLS socket cannot half-close, and one SSL object must not be driven from
    two threads, so TLS runs here in memory (``wrap_bio``) on one thread; only
    stdin is read by a helper thread.  End of input is a TLS close_notify, which
    the server takes as end of input: it flushes its replies and closes.

    Raises:
        ClientError: connecting, the handshake or the connection failed.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded.
    """
    from aecho.tls import client_context, describe_handshake_error

    where = _describe(config)
    ctx = client_context(config.cafile, config.insecure)
    raw = connect(replace(config, tls=False, cafile=None, insecure=False))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=config.host)
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
    wake_r, wake_w = socket.socketpair()
    read = getattr(stdin, "read1", stdin.read)

    def pump() -> None:
        try:
            while chunk := read(CHUNK):
                chunks.put(chunk)
                with contextlib.suppress(OSError):
                    wake_w.send(b"\0")
        finally:
            chunks.put(None)
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")

    sel = selectors.DefaultSelector()
    reader = threading.Thread(target=pump, name="aecho-client-stdin", daemon=True)
    try:
        raw.setblocking(False)
        sel.register(raw, selectors.EVENT_READ)
        sel.register(wake_r, selectors.EVENT_READ)
        handshaken = input_done = shut = False
        to_send = bytearray()
        while True:
            if not handshaken:
                try:
                    tls.do_handshake()
                    handshaken = True
                    reader.start()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    raise ClientError(describe_handshake_error(where, exc)) from exc
            if handshaken:
                # Take more input only when the last has gone out: stdin waits on the network.
                while not input_done and len(to_send) + outgoing.pending < CHUNK:
                    try:
                        chunk = chunks.get_nowait()
                    except queue.Empty:
                        break
                    if chunk is None:
                        input_done = True
                    else:
                        tls.write(chunk)
                try:
                    while data := tls.read(CHUNK):
                        stdout.write(data)
                    break  # an empty read: the server's close_notify
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                except ssl.SSLError as exc:
                    raise ClientError(f"TLS error from {where}: {exc.reason or exc}") from exc
                stdout.flush()
                if input_done and not shut and not to_send and not outgoing.pending:
                    shut = True
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.unwrap()
            to_send += outgoing.read()
            if to_send:
                try:
                    del to_send[: raw.send(to_send)]
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise ClientError(f"connection to {where} broke: {exc.strerror}") from exc
            sel.modify(raw, selectors.EVENT_READ | (selectors.EVENT_WRITE if to_send else 0))
            ready = sel.select(REPLY_TIMEOUT_S if not handshaken else None)
            if not ready and not handshaken:
                raise ClientError(f"TLS handshake with {where} timed out (is it a TLS server?)")
            for key, events in ready:
                if key.fileobj is wake_r:
                    wake_r.recv(4096)
                elif events & selectors.EVENT_READ:
                    try:
                        data = raw.recv(CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise ClientError(f"connection to {where} broke: {exc.strerror}") from exc
                    if data:
                        incoming.write(data)
                    else:
                        incoming.write_eof()  # the next read reports the end
        stdout.flush()
    finally:
        sel.close()
        raw.close()
        wake_r.close()
        wake_w.close()


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
