"""How bench is stopped early: Ctrl-C (SIGINT) or SIGTERM once stops sending and waits for
the replies still owed, up to a limit; once more cuts that wait short.  Either way the
report comes out whole, however often they come."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

# Told when a stopped run starts to wait for the replies still owed: the longest it waits.
WaitFn = Callable[[float], None]


class Interrupts:
    """Whether a measurement of this bench took a Ctrl-C or SIGTERM.  Before, one raises
    KeyboardInterrupt (the embedded server starting, between search steps); from then on
    one only hurries the measurement along, and must not cut the report short."""

    taken = False


def interrupt(signum: int, frame: object) -> None:
    """The handler while no measurement takes the signals itself."""
    if not Interrupts.taken:
        raise KeyboardInterrupt


def waiting_note(drain_s: float) -> str:
    return (
        f"stopping: waiting up to {drain_s:g} s for the replies still owed "
        "(Ctrl-C again to stop now)"
    )


def say_waiting(drain_s: float) -> None:
    """One line on stderr: why a stopped bench has not reported yet, and how to hurry it."""
    print(f"aecho bench: {waiting_note(drain_s)}", file=sys.stderr, flush=True)


def ignore(signals: frozenset[signal.Signals]) -> dict[signal.Signals, Any]:
    """Ignore ``signals`` (in the main thread only); return what to restore."""
    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: not ours to change
        for sig in signals:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    return previous


def restore(previous: dict[signal.Signals, Any]) -> None:
    """Put back handlers from :func:`signal.getsignal` or :func:`ignore`; None (one not
    installed from Python) cannot be put back, and is left as it is now."""
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def add_stop_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> list[tuple[signal.Signals, Any]]:
    """Call ``callback`` on the loop at each SIGINT and SIGTERM; return what to restore."""
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, callback)
        except (ValueError, RuntimeError, NotImplementedError):
            break  # not the main thread: signals are the caller's business
        installed.append((sig, previous))
    return installed


class Counter:
    """SIGINT and SIGTERM counted rather than raised while spawned workers run (in the main
    thread only): a KeyboardInterrupt in the middle of reading a worker's pipe would lose
    its result, or leave the pipe out of step.  Each one wakes whoever waits on
    :attr:`wakeup` with ``multiprocessing.connection.wait``."""

    def __init__(self) -> None:
        self.count = 0
        self.seen = 0
        self.wakeup, self._ping = socket.socketpair()
        self.wakeup.setblocking(False)
        self._ping.setblocking(False)
        self._previous: dict[signal.Signals, Any] = {}
        self._wakeup_fd: int | None = None

    def __enter__(self) -> Counter:
        try:
            self._wakeup_fd = signal.set_wakeup_fd(self._ping.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are the caller's business
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._count)
        return self

    def _count(self, signum: int, frame: object) -> None:
        self.count += 1

    def new(self) -> int:
        """How many came since the last call."""
        with contextlib.suppress(BlockingIOError):
            while self.wakeup.recv(4096):
                pass
        fresh, self.seen = self.count - self.seen, self.count
        return fresh

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        restore(self._previous)
        if self._wakeup_fd is not None:
            signal.set_wakeup_fd(self._wakeup_fd)
        self.wakeup.close()
        self._ping.close()
