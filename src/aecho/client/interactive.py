"""Interactive mode: a prompt with line editing and history, a reply per line."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import ssl
import sys
from pathlib import Path
from types import FrameType, ModuleType

from aecho.client.connection import (
    CHUNK,
    ClientError,
    OutputClosed,
    broke,
    closed,
    connect,
    describe,
    no_reply,
)
from aecho.config import ClientConfig

PROMPT = "client > "
HISTORY_LENGTH = 1000
# Replies that arrive while the prompt is up wait here for the next line; past this the
# socket is left unread, so a server cannot fill the client's memory while a person types.
MAX_UNREAD = 1 << 20


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
            raise broke(self._where, exc) from exc
        finally:
            self._sock.settimeout(timeout)
        if not data:
            raise closed(self._where)
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
    where = describe(config)
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
            raise no_reply(where, timeout) from None
        except OSError as exc:
            raise broke(where, exc) from exc
        if reply is None:
            raise closed(where)
        print(reply[:-1].decode("utf-8", "replace"), flush=True)
