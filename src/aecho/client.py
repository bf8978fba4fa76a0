"""``aecho client``: interactive on a terminal, a byte-exact pipe otherwise.

Plain sockets, no event loop: one peer, no concurrency worth one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType, ModuleType
from typing import BinaryIO

from aecho.address import format_address
from aecho.config import ClientConfig

PROMPT = "client > "
CHUNK = 64 * 1024
HISTORY_LENGTH = 1000
# Replies that arrive while the prompt is up wait here for the next line; past this the
# socket is left unread, so a server cannot fill the client's memory while a person types.
MAX_UNREAD = 1 << 20


class ClientError(RuntimeError):
    """A connection problem; str() is the one-line message for the user."""


class OutputClosed(Exception):
    """Whoever reads stdout has gone (EPIPE): not a network failure, nothing to report."""


def _describe(config: ClientConfig) -> str:
    return config.unix or format_address((config.host, config.port))


def _no_reply(where: str, timeout: float) -> ClientError:
    return ClientError(
        f"no reply from {where} within {timeout:g}s of the last byte sent "
        "(--timeout sets how long; 0 waits forever)"
    )


def _broke(where: str, exc: OSError) -> ClientError:
    return ClientError(f"connection to {where} broke: {exc.strerror or exc}")


def _closed(where: str) -> ClientError:
    return ClientError(f"server closed the connection ({where})")


def _cut_short(where: str) -> ClientError:
    return ClientError(f"server closed the connection before the end of input ({where})")


def _write_out(stdout: BinaryIO, data: bytes) -> None:
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


def _handshake_timed_out(where: str) -> ClientError:
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
        raise _handshake_timed_out(where) from exc
    except OSError as exc:
        raise ClientError(f"TLS handshake with {where} failed: {exc.strerror or exc}") from exc
    finally:
        sock.close()  # detached by wrap_socket on success; closes it on failure


# -- pipe mode -----------------------------------------------------------------------------------


class _Plain:
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


class _Tls:
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


class _Stdin:
    """stdin read by a thread, chunk by chunk, into a short queue.

    stdin stays blocking (O_NONBLOCK would change the file description the shell shares),
    so a thread reads it and wakes the pipe loop through a socket pair, which select can
    watch.  ``os.read`` rather than the buffered object: a thread still blocked in it when
    the process exits holds no lock that interpreter shutdown would wait for.
    """

    def __init__(self, stdin: BinaryIO) -> None:
        self._read = getattr(stdin, "read1", stdin.read)
        with contextlib.suppress(AttributeError, OSError):
            fd = stdin.fileno()
            self._read = lambda n: os.read(fd, n)
        self._chunks: queue.Queue[bytes | OSError | None] = queue.Queue(maxsize=8)
        self.wake, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._read_all, name="aecho-client-stdin", daemon=True
        )

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def _put(self, item: bytes | OSError | None) -> None:
        self._chunks.put(item)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _read_all(self) -> None:
        try:
            while chunk := self._read(CHUNK):
                self._put(chunk)
        except OSError as exc:
            self._put(exc)
        else:
            self._put(None)

    def take(self) -> bytes | None:
        """The next chunk, b"" when none is ready yet, None at end of input.

        Raises:
            ClientError: stdin could not be read.
        """
        try:
            item = self._chunks.get_nowait()
        except queue.Empty:
            return b""
        if isinstance(item, OSError):
            raise ClientError(f"cannot read stdin: {item.strerror or item}")
        return item

    def close(self) -> None:
        self.wake.close()
        self._wake_w.close()


def run_pipe(config: ClientConfig, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Stream ``stdin`` to the server and its replies to ``stdout`` until the server closes.

    Raises:
        ClientError: connecting failed, the connection broke, the server closed it before
            the end of input, or it stayed silent longer than ``config.timeout``.
        OutputClosed: stdout was closed by its reader.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded.
    """
    tls = _Tls(config, _describe(config)) if config.tls else None
    sock = connect(replace(config, tls=False, cafile=None, insecure=False))
    source = _Stdin(stdin)
    try:
        _Pipe(config, sock, tls or _Plain(sock), source, stdout).run()
    finally:
        sock.close()
        source.close()


class _Pipe:
    """One thread moves stdin to the socket and the socket to stdout, never blocking on one
    side while the other has work, and measures the server's silence.

    The silence counts while the server owes something: bytes or the end of input went
    out since it last answered, or bytes wait to go out (a server that does not read).
    A slow stdin is not the server's silence.
    """

    def __init__(
        self,
        config: ClientConfig,
        sock: socket.socket,
        wire: _Plain | _Tls,
        source: _Stdin,
        stdout: BinaryIO,
    ) -> None:
        self.config = config
        self.where = _describe(config)
        self.sock, self.wire, self.source, self.stdout = sock, wire, source, stdout
        self.to_send = bytearray()
        self.input_done = False
        self.finished = False  # end of input sent: a half-close or a close_notify
        self.owed = False
        self.quiet_since = time.monotonic()

    def run(self) -> None:
        """Raises: ClientError, OutputClosed: as :func:`run_pipe`."""
        handshake_deadline = time.monotonic() + self.config.connect_timeout
        self.sock.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self.source.wake, selectors.EVENT_READ)
            self.wire.handshake()  # TLS: the ClientHello
            while True:
                if self.wire.ready:
                    self._take_input()
                self._send()
                writing = selectors.EVENT_WRITE if self.to_send else 0
                sel.modify(self.sock, selectors.EVENT_READ | writing)
                deadline = handshake_deadline if not self.wire.ready else self._deadline()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = sel.select(wait)
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    if not self.wire.ready:
                        raise _handshake_timed_out(self.where)
                    raise _no_reply(self.where, self.config.timeout)
                for key, events in ready:
                    if key.fileobj is self.source.wake:
                        self.source.wake.recv(4096)
                    elif events & selectors.EVENT_READ and self._receive():
                        return

    def _deadline(self) -> float | None:
        if self.config.timeout and (self.owed or self.to_send):
            return self.quiet_since + self.config.timeout
        return None

    def _take_input(self) -> None:
        """Raises: ClientError: stdin cannot be read, or the half-close failed."""
        self.source.start()
        # Take more input only once the last has gone out: stdin waits on the network.
        while not self.input_done and len(self.to_send) < CHUNK:
            chunk = self.source.take()
            if chunk is None:
                self.input_done = True
            elif not chunk:
                return
            else:
                self.wire.write(chunk)
                self.to_send += self.wire.outgoing()
        if self.input_done and not self.finished and not self.to_send:
            try:
                self.wire.finish()
            except OSError as exc:
                raise _broke(self.where, exc) from exc
            self.finished = self.owed = True
            self.quiet_since = time.monotonic()

    def _send(self) -> None:
        """Raises: ClientError: the connection broke or the server has closed it."""
        self.to_send += self.wire.outgoing()
        if not self.to_send:
            return
        try:
            sent = self.sock.send(self.to_send)
        except BlockingIOError:
            return
        except BrokenPipeError:
            raise _cut_short(self.where) from None
        except OSError as exc:
            raise _broke(self.where, exc) from exc
        del self.to_send[:sent]
        self.owed = True
        self.quiet_since = time.monotonic()

    def _receive(self) -> bool:
        """Pass what arrived on to stdout; True once the server has closed the stream.

        Raises:
            ClientError: the connection broke, or the server closed it before the end of
                input.
            OutputClosed: stdout was closed by its reader.
        """
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _broke(self.where, exc) from exc
        reply, ended = self.wire.received(data)
        if reply:
            _write_out(self.stdout, reply)
            self.owed = self.finished  # after the end of input, the close is still owed
        self.quiet_since = time.monotonic()  # after the write: a slow stdout is not silence
        if ended and not self.finished:
            raise _cut_short(self.where)
        return ended


# -- interactive mode ----------------------------------------------------------------------------


def history_path() -> Path | None:
    """``$XDG_STATE_HOME/aecho/client_history`` (``~/.local/state`` by default), or None
    without a home directory."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec: a relative path is invalid, ignore it
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        state = os.path.join(home, ".local", "state")
    return Path(state) / "aecho" / "client_history"


class _History:
    """Readline history kept from one run to the next, as shells and Python's own prompt
    keep it.

    Each run appends only its own lines, so two clients at once lose neither's.  A
    history that cannot be read or written is skipped without a word, as Python's prompt
    does: it is a convenience, never a reason to refuse to talk to a server.
    """

    def __init__(self, readline: ModuleType | None, path: Path | None) -> None:
        self._readline = readline
        self._path = path
        self._start = 0
        if readline is None or path is None:
            return
        readline.set_history_length(HISTORY_LENGTH)
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
        self._start = readline.get_current_history_length()

    def save(self) -> None:
        if self._readline is None or self._path is None:
            return
        new = self._readline.get_current_history_length() - self._start
        if new <= 0:
            return
        with contextlib.suppress(OSError):
            # The XDG spec: create missing directories 0700; the lines typed may be private.
            for directory in reversed([self._path.parent, *self._path.parent.parents]):
                if not directory.is_dir():
                    directory.mkdir(mode=0o700)
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            self._readline.append_history_file(new, self._path)


def _load_readline() -> ModuleType | None:
    try:
        import readline  # importing it gives input() line editing and history
    except ImportError:
        return None
    return readline


class _PromptWatch:
    """While ``input()`` waits, look at the socket ten times a second, so that a server
    that closes the connection (its idle timeout, a restart) is reported at once, not
    after the next line typed is lost.

    readline gives Python no way to wait on a second descriptor, but it returns to Python
    at every signal, and a signal handler that raises ends ``input()`` with the terminal
    restored.  An interval timer supplies the signals.  The handler runs on the one thread
    there is, so the socket, TLS included, is never used from two threads.
    """

    INTERVAL = 0.1

    def __init__(self, sock: socket.socket, unread: bytearray, where: str) -> None:
        self._sock = sock
        self._unread = unread
        self._where = where
        self._armed = False
        self._previous = signal.signal(signal.SIGALRM, self._tick)

    def __enter__(self) -> None:
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, self.INTERVAL, self.INTERVAL)

    def __exit__(self, *exc_info: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._armed = False

    def close(self) -> None:
        signal.signal(signal.SIGALRM, self._previous)

    def _tick(self, signum: int, frame: FrameType | None) -> None:
        """Raises: ClientError: the server closed or reset the connection."""
        if not self._armed or len(self._unread) >= MAX_UNREAD:
            return
        pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()
        if not pending and not select.select([self._sock], [], [], 0)[0]:
            return
        timeout = self._sock.gettimeout()
        self._sock.settimeout(0)
        try:
            data = self._sock.recv(CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return  # a TLS record that carried no data (a resumption ticket)
        except OSError as exc:
            raise _broke(self._where, exc) from exc
        finally:
            self._sock.settimeout(timeout)
        if not data:
            raise _closed(self._where)
        self._unread += data


def _read_reply(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read up to and including the next newline; None when the server closed.

    Raises:
        TimeoutError: the socket's timeout passed without the rest of the line.
        OSError: the connection broke.
    """
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
        ClientError: connecting failed, the connection broke or was closed by the server,
            or a reply took longer than ``config.timeout``.
        OutputClosed: stdout was closed by its reader.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded.
    """
    history = _History(_load_readline(), history_path())
    sock = connect(config)
    sock.settimeout(config.timeout or None)
    where = _describe(config)
    print(f"connected to {where}; type a line, `quit` or Ctrl-D to end", file=sys.stderr)
    unread = bytearray()
    watch = _PromptWatch(sock, unread, where)
    try:
        _converse(sock, unread, watch, where, config.timeout)
    except BrokenPipeError:  # the socket's own are reported inside: this is stdout's
        raise OutputClosed from None
    finally:
        watch.close()
        sock.close()
        history.save()


def _converse(
    sock: socket.socket, unread: bytearray, watch: _PromptWatch, where: str, timeout: float
) -> None:
    """The prompt loop of :func:`run_interactive`.

    Raises:
        ClientError: as :func:`run_interactive`.
        BrokenPipeError: stdout was closed by its reader.
    """
    while True:
        try:
            with watch:
                line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        except ClientError:
            print(file=sys.stderr)  # the prompt's line is still open
            raise
        if line.strip() == "quit":
            return
        try:
            sock.sendall(line.encode("utf-8", "surrogateescape") + b"\n")
            reply = _read_reply(sock, unread)
        except TimeoutError:
            raise _no_reply(where, timeout) from None
        except OSError as exc:
            raise _broke(where, exc) from exc
        if reply is None:
            raise _closed(where)
        print(reply[:-1].decode("utf-8", "replace"), flush=True)


def run(config: ClientConfig) -> None:
    """Interactive on a terminal, pipe mode otherwise.

    Raises:
        ClientError: connecting failed, the connection broke, or the server fell silent.
        OutputClosed: stdout was closed by its reader.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded.
    """
    if sys.stdin.isatty():
        run_interactive(config)
    else:
        run_pipe(config, sys.stdin.buffer, sys.stdout.buffer)
