"""The code that runs inside a pool process: set-up, then batches from its socket.

A worker reads a batch, runs the handler on each message in order, writes the result
and reads the next, until the pool closes its end of the socket.  It writes the batch's
number, and each message's index before running it, into memory it shares with the
pool (its progress), so the pool can tell which message a late batch is on.  Its only
thread besides that one watches the server (see :func:`init`), and nothing is pickled:
:mod:`aecho.offload.wire` says what crosses.  The traceback of a failure is
formatted only when the server logs at debug level (else it is empty).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import signal
import socket
import threading
import time
import traceback

from aecho.offload import wire
from aecho.offload.handlers import (
    HANDLER_FAILURES,
    Handler,
    HandlerError,
    as_bytes,
    load_handler,
)
from aecho.text import exception_text

WORKER_TITLE = "aecho: pool worker"
READ_BUFFER = 256 * 1024

_PR_SET_PDEATHSIG = 1
_tracebacks = False  # whether failures carry their formatted traceback
# This worker's end of its socket: tests make a worker break the protocol through it.
channel: socket.socket | None = None


def serve(
    sock: socket.socket,
    server_pid: int,
    directory: str | None,
    tracebacks: bool,
    handler_name: str,
) -> None:
    """A worker's whole life (its process's target); returns once the pool is gone.

    A handler that does not resolve is reported once, as ``REFUSED``, and the worker
    then fails every message with that error rather than exit: a replacement whose
    handler no longer loads must not make the pool replace it again and again.
    """
    global channel
    channel = sock
    init(server_pid, directory, tracebacks)
    handler: Handler | None = None
    refusal = ""
    try:
        progress = _send_fds(sock)
        try:
            handler = load_handler(handler_name, directory)
        except HandlerError as exc:
            refusal = str(exc)
            sock.sendall(wire.refused(refusal))
        else:
            sock.sendall(wire.hello())
        reader = sock.makefile("rb", buffering=READ_BUFFER)
        number = 0  # of the batch, as the pool counts the batches it sent this worker
        while True:
            head = reader.read(wire.BATCH.size)
            if len(head) < wire.BATCH.size:
                return  # the pool closed its end
            count, blob = wire.BATCH.unpack(head)
            size = wire.LENGTH * count + blob
            body = reader.read(size)
            if len(body) < size:
                return  # the pool closed its end mid-batch
            messages = wire.split(body, 0, count, blob)
            number += 1
            if handler is None:
                failed = dict.fromkeys(range(count), ("HandlerError", refusal, ""))
                sock.sendall(wire.result([b""] * count, failed, 0.0))
            else:
                sock.sendall(wire.result(*run_batch(handler, messages, progress, number)))
    except OSError:
        return  # the pool is gone


def _send_fds(sock: socket.socket) -> memoryview:
    """Hand the pool a pidfd of this process, so it can signal it without a pid, and the
    memory this worker writes its progress to (see :func:`run_batch`); returns that
    memory, as 32-bit words, memory of its own where the pool cannot share it."""
    progress = memoryview(bytearray(wire.PROGRESS.size))
    try:
        fds = [os.pidfd_open(os.getpid())]
    except (OSError, AttributeError):
        sock.sendall(b"P")  # no pidfds here: the pool does without, and without progress
        return progress.cast("I")
    try:
        with contextlib.suppress(OSError, AttributeError):
            memfd = os.memfd_create("aecho-progress", os.MFD_CLOEXEC)
            try:
                os.ftruncate(memfd, wire.PROGRESS.size)
                shared = mmap.mmap(memfd, wire.PROGRESS.size)
            except OSError:
                os.close(memfd)
                raise
            fds.append(memfd)
            progress = memoryview(shared)
        socket.send_fds(sock, [b"P"], fds)
    finally:
        for fd in fds:
            os.close(fd)
    return progress.cast("I")


def init(server_pid: int, directory: str | None = None, tracebacks: bool = False) -> None:
    """First thing in every worker: title, signals, and the watch on the server.

    ``directory`` is where handlers are imported from first (the forkserver shares
    neither the server's ``sys.path`` nor, for a daemon, its original working
    directory); with ``tracebacks`` a failure carries its formatted traceback.

    Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and
    the server turns it into a graceful stop and shuts its workers down itself.
    """
    from setproctitle import setproctitle

    global _tracebacks
    _tracebacks = tracebacks

    setproctitle(WORKER_TITLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The forkserver, not the server, is a worker's parent: the death signal covers
    # the forkserver dying, and getppid() closes the race of it dying before the arming.
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)
    _watch_server(server_pid)


def _watch_server(server_pid: int) -> None:
    """Exit this worker as soon as the server process is gone, even after SIGKILL.

    A pidfd becomes readable when its process exits, zombie or not; kernels
    without pidfds get a once-a-second liveness poll instead.
    """
    try:
        pidfd = os.pidfd_open(server_pid)
    except ProcessLookupError:
        os._exit(0)
    except (OSError, AttributeError):
        pidfd = -1

    def watch() -> None:
        if pidfd >= 0:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll():
                pass
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(server_pid, 0)
                except ProcessLookupError:
                    break
        os._exit(0)

    threading.Thread(target=watch, name="aecho-server-watch", daemon=True).start()


def run_batch(
    handler: Handler, messages: list[bytes], progress: memoryview, number: int
) -> tuple[list[bytes], wire.Failures, float]:
    """Run ``handler`` on every message, in order; ``progress`` says that this is the
    ``number``-th batch, and the index of the message it runs (see :mod:`aecho.offload.wire`).

    Returns the replies (a failed message's reply is empty), the failures by index,
    and the seconds spent.
    """
    out: list[bytes] = []
    append = out.append
    failures: wire.Failures = {}
    progress[0] = wire.NOT_STARTED  # before the number: never the last batch's index
    progress[1] = number & 0xFFFFFFFF
    started = time.perf_counter()
    for i, message in enumerate(messages):
        progress[0] = i
        try:
            reply = handler(message)
            if type(reply) is not bytes:
                reply = as_bytes(reply)
            append(reply)
        except HANDLER_FAILURES as exc:
            trace = traceback.format_exc() if _tracebacks else ""
            failures[i] = (type(exc).__name__, exception_text(exc), trace)
            append(b"")
    return out, failures, time.perf_counter() - started
