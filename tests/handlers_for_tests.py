"""Handlers the offload tests run by name (``tests.handlers_for_tests:NAME``), in workers too."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

not_callable = 42


def boom(data: bytes) -> bytes:
    """Raise for messages starting with ``boom``; echo the rest."""
    if data.startswith(b"boom"):
        raise ValueError(f"refused {data[:16]!r}")
    return data


def exits(data: bytes) -> bytes:
    """Raise SystemExit for messages starting with ``exit`` (as argparse does on input it
    refuses); echo the rest."""
    if data.startswith(b"exit"):
        raise SystemExit(2)
    return data


def interrupts(data: bytes) -> bytes:
    """Raise KeyboardInterrupt for messages starting with ``kbint``; echo the rest."""
    if data.startswith(b"kbint"):
        raise KeyboardInterrupt
    return data


def gives_str(data: bytes) -> bytes:
    """Return a str, not bytes, for messages starting with ``str``; echo the rest."""
    if data.startswith(b"str"):
        return data.decode()  # type: ignore[return-value]
    return data


def jitter(data: bytes) -> bytes:
    """Echo after a random pause of up to 0.5 ms, so batches finish out of order."""
    time.sleep(random.random() * 0.0005)
    return data


def _spin(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


def costly_upper(data: bytes) -> bytes:
    """``upper`` after 50 us of CPU: enough queued work for connections to take turns."""
    _spin(50e-6)
    return data.upper()


def costly_crash(data: bytes) -> bytes:
    """The worker dies on a message starting with ``crash``; echo the rest after 50 us of
    CPU."""
    if data.startswith(b"crash"):
        os._exit(3)
    _spin(50e-6)
    return data


def stall(data: bytes) -> bytes:
    """``stall PATH``: write this worker's pid to PATH, then hang (to be killed); echo the rest."""
    if data.startswith(b"stall "):
        path = Path(data[6:].decode())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(path)
        time.sleep(60)
    return data


def hang(data: bytes) -> bytes:
    """Hang on ``hang``; echo the rest."""
    if data == b"hang":
        time.sleep(60)
    return data


def costly_hang(data: bytes) -> bytes:
    """Hang on ``hang``; echo the rest after 1 ms of CPU (a task of one message each)."""
    if data == b"hang":
        time.sleep(60)
    _spin(1e-3)
    return data


def nap(data: bytes) -> bytes:
    """Echo after 0.3 s."""
    time.sleep(0.3)
    return data


def nap_or_fatal(data: bytes) -> bytes:
    """Echo ``nap`` after 0.3 s; the worker dies on ``fatal`` and hangs on ``hang``; echo
    the rest."""
    if data == b"nap":
        time.sleep(0.3)
    elif data == b"fatal":
        os._exit(3)
    elif data == b"hang":
        time.sleep(60)
    return data


def crash(data: bytes) -> bytes:
    """The worker process dies on a message starting with ``crash`` (as a segfault would
    take it); echo the rest."""
    if data.startswith(b"crash"):
        os._exit(3)
    return data


def faulty(data: bytes) -> bytes:
    """Break this worker's socket to the pool as ``data`` says; echo the rest.

    ``hangup`` shuts the socket (the worker lives on), ``garbage`` writes bytes that are
    no frame, ``miscount`` a result of two replies to this one message, ``partial exit``
    half of this message's result and then exits, ``partial hang`` the same and then
    hangs, ``partial exit slowly...`` the same as ``partial exit`` but half a second late
    (time for the pool to send it its next batch, which it then leaves unread).
    """
    from aecho.offload import wire, worker

    channel = worker.channel
    if channel is None:  # not in a pool worker
        return data
    if data == b"hangup":
        channel.shutdown(socket.SHUT_RDWR)
    elif data == b"garbage":
        channel.sendall(b"garbage!" * 8)
    elif data == b"miscount":
        channel.sendall(wire.result([data, data], {}, 0.0))
    elif data.startswith(b"partial "):
        if data.startswith(b"partial exit slowly"):
            time.sleep(0.5)
        frame = wire.result([data], {}, 0.0)
        channel.sendall(frame[: len(frame) // 2])
        if data.startswith(b"partial exit"):
            os._exit(3)
        time.sleep(60)
    return data


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def unprintable(data: bytes) -> bytes:
    """Raise an exception whose str() itself raises, on ``unprintable``; echo the rest."""
    if data == b"unprintable":
        raise _Unprintable()
    return data


def held_at_gate(data: bytes) -> bytes:
    """Echo once the file the line starts with (``GATE padding``) is gone (at most 60 s)."""
    gate = data.split(b" ", 1)[0].decode()
    for _ in range(6000):
        if not os.path.exists(gate):
            break
        time.sleep(0.01)
    return data


def multiline(data: bytes) -> bytes:
    """Raise with control characters in the text (a newline, a carriage return, a terminal
    escape) for messages starting with ``ml``; echo the rest."""
    if data.startswith(b"ml"):
        raise ValueError("first line\nsecond line\r\x1b[31mred\u2028end")
    return data
