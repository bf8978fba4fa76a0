"""The code that runs inside a pool process: set-up, and running one packed batch.

A batch crosses the process boundary packed: one bytes object holding every message
back to back, and their lengths as a machine-int array.  Pickling one object instead
of hundreds keeps the executor's threads, which share the server's GIL, off the event
loop's back.  Replies come back the same way, with failures as
``{index: (exception name, text, traceback)}``: never the exception object, since one
that pickles but cannot be unpickled would break the executor.  The traceback is
formatted only when the server logs at debug level (else it is empty).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import select
import signal
import threading
import time
import traceback

from aecho.offload.handlers import Handler, load_handler

WORKER_TITLE = "aecho: pool worker"

Packed = tuple[bytes, bytes]
Failures = dict[int, tuple[str, str, str]]

_PR_SET_PDEATHSIG = 1
_handlers: dict[str, Handler] = {}
_directory: str | None = None  # where handlers are imported from first
_tracebacks = False  # whether failures carry their formatted traceback


def pack(messages: list[bytes]) -> Packed:
    return b"".join(messages), array.array("I", map(len, messages)).tobytes()


def unpack(packed: Packed) -> list[bytes]:
    blob, lengths = packed
    out: list[bytes] = []
    append = out.append
    offset = 0
    for n in array.array("I", lengths):
        end = offset + n
        append(blob[offset:end])
        offset = end
    return out


def init(server_pid: int, directory: str | None = None, tracebacks: bool = False) -> None:
    """First thing in every worker: title, signals, and the watch on the server.

    ``directory`` is where handlers are imported from first (the forkserver shares
    neither the server's ``sys.path`` nor, for a daemon, its original working
    directory); with ``tracebacks`` a failure carries its formatted traceback.

    Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and
    the server turns it into a graceful stop and shuts its workers down itself.
    """
    from setproctitle import setproctitle

    global _directory, _tracebacks
    _directory, _tracebacks = directory, tracebacks

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


def _resolve(name: str) -> Handler:
    """The handler for ``name``, imported once per worker.

    Raises:
        HandlerError: the name does not resolve in the worker.
    """
    handler = _handlers.get(name)
    if handler is None:
        handler = _handlers[name] = load_handler(name, _directory)
    return handler


def ready(handler_name: str) -> int:
    """Warm-up task: resolve the handler now, return the worker's pid.

    Raises:
        HandlerError: the handler cannot be loaded in the worker.
    """
    _resolve(handler_name)
    return os.getpid()


def run_batch(handler_name: str, packed: Packed) -> tuple[Packed, Failures, float]:
    """Run the handler on every message of a packed batch.

    Returns the packed replies (a failed message's reply is empty), the failures
    by index, and the seconds spent.

    Raises:
        HandlerError: the handler cannot be loaded in the worker.
    """
    handler = _handlers.get(handler_name) or _resolve(handler_name)
    out: list[bytes] = []
    append = out.append
    failures: Failures = {}
    started = time.perf_counter()
    for i, message in enumerate(unpack(packed)):
        try:
            reply = handler(message)
            if type(reply) is not bytes:
                reply = _as_bytes(reply)
            append(reply)
        except Exception as exc:
            trace = traceback.format_exc() if _tracebacks else ""
            failures[i] = (type(exc).__name__, str(exc), trace)
            append(b"")
    return pack(out), failures, time.perf_counter() - started


def _as_bytes(reply: object) -> bytes:
    """Raises: TypeError: the handler returned something that is not bytes-like."""
    if isinstance(reply, bytes | bytearray | memoryview):
        return bytes(reply)
    raise TypeError(f"handler returned {type(reply).__name__}, not bytes")
