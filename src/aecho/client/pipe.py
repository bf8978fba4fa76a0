"""Pipe mode: stdin to the server, its replies to stdout, byte for byte."""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import replace
from typing import BinaryIO

from aecho.client.connection import (
    CHUNK,
    ClientError,
    Plain,
    Tls,
    broke,
    connect,
    cut_short,
    describe,
    handshake_timed_out,
    no_reply,
    write_out,
)
from aecho.config import ClientConfig


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
    tls = Tls(config, describe(config)) if config.tls else None
    sock = connect(replace(config, tls=False, cafile=None, insecure=False))
    source = _Stdin(stdin)
    try:
        _Pipe(config, sock, tls or Plain(sock), source, stdout).run()
    finally:
        sock.close()
        source.close()


class _Pipe:
    """One thread moves stdin to the socket and the socket to stdout, never blocking on one
    side while the other has work, and measures the server's silence.

    The silence counts while the server owes something: the end of input went out, or
    bytes went out and the replies have not caught up with them (as many bytes, as an echo
    answers, or as many lines, as a line handler does), or bytes wait to go out (a server
    that does not read).  A slow stdin is not the server's silence.
    """

    def __init__(
        self,
        config: ClientConfig,
        sock: socket.socket,
        wire: Plain | Tls,
        source: _Stdin,
        stdout: BinaryIO,
    ) -> None:
        self.config = config
        self.where = describe(config)
        self.sock, self.wire, self.source, self.stdout = sock, wire, source, stdout
        self.to_send = bytearray()
        self.input_done = False
        self.finished = False  # end of input sent: a half-close or a close_notify
        self.owed = False
        self.quiet_since = time.monotonic()
        # What went in and came back, to tell when the replies have caught up.
        self.put_bytes = self.put_lines = self.got_bytes = self.got_lines = 0

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
                # End of input taken with the last chunk goes out once that has: nothing
                # else may wake the loop for it.
                if self.wire.ready and self._finish_input():
                    self._send()  # TLS: the close_notify
                writing = selectors.EVENT_WRITE if self.to_send else 0
                sel.modify(self.sock, selectors.EVENT_READ | writing)
                deadline = handshake_deadline if not self.wire.ready else self._deadline()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = sel.select(wait)
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    if not self.wire.ready:
                        raise handshake_timed_out(self.where)
                    raise no_reply(self.where, self.config.timeout)
                for key, events in ready:
                    if key.fileobj is self.source.wake:
                        self.source.wake.recv(4096)
                    elif events & selectors.EVENT_READ and self._receive():
                        return

    def _deadline(self) -> float | None:
        if self.config.timeout and (self.owed or self.to_send):
            return self.quiet_since + self.config.timeout
        return None

    def _caught_up(self) -> bool:
        if self.got_bytes >= self.put_bytes:
            return True
        return 0 < self.put_lines <= self.got_lines

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
                self.put_bytes += len(chunk)
                self.put_lines += chunk.count(b"\n")
        self._finish_input()

    def _finish_input(self) -> bool:
        """At end of input, once everything before it went out: half-close (TLS: a
        close_notify); whether it did so now.

        Raises:
            ClientError: the half-close failed.
        """
        if not self.input_done or self.finished or self.to_send:
            return False
        try:
            self.wire.finish()
        except OSError as exc:
            raise broke(self.where, exc) from exc
        self.finished = self.owed = True
        self.quiet_since = time.monotonic()
        return True

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
            raise cut_short(self.where) from None
        except OSError as exc:
            raise broke(self.where, exc) from exc
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
            raise broke(self.where, exc) from exc
        reply, ended = self.wire.received(data)
        if reply:
            write_out(self.stdout, reply)
            self.got_bytes += len(reply)
            self.got_lines += reply.count(b"\n")
            # After the end of input the close is still owed; before, what has not come back.
            self.owed = self.finished or not self._caught_up()
        self.quiet_since = time.monotonic()  # after the write: a slow stdout is not silence
        if ended and not self.finished:
            raise cut_short(self.where)
        return ended


# -- interactive mode ----------------------------------------------------------------------------
