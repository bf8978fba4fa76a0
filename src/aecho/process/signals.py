"""Signals held back while a serving process starts.

USR1 (reopen logs), HUP (reload), TTIN and TTOU (one serving process more or less) can
come at any moment: logrotate sends USR1 as soon as a pidfile names a process.  Before
a process has its handlers, their default actions would end it (USR1, HUP) or suspend
it (TTIN, TTOU).  TERM and INT would end it without its cleanup: a pidfile (or a socket
file) left behind, or, for INT, an exit status of 1.  ``aecho serve`` blocks them all
first thing; once its handlers are in place it unblocks them, and one that came in the
meantime is handled then.  A TERM or INT that came while starting is taken first
(:func:`take_stop`), so the process stops before it serves instead of announcing that
it does.  The mask is inherited through ``fork``: a daemon holds them until its own
loop has its handlers (its foreground waits with its own, ``process.daemon``); a
serving process forked by the supervisor holds the operator signals, not TERM and INT
(``process.children``).  Import cost: ``signal`` alone.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

HELD = frozenset({signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU})
STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
_ALL = HELD | STOPS


def hold() -> None:
    """Block these signals in this thread (and in whatever it forks)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _ALL)


def release() -> None:
    """Unblock them: one that came while they were held is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _ALL)


def take_stop() -> signal.Signals | None:
    """The TERM or INT that came while they were held, taken out of the pending ones
    (so it is not delivered again at :func:`release`); None if none came."""
    found: signal.Signals | None = None
    while signal.sigpending() & STOPS:
        info = signal.sigtimedwait(STOPS, 0)
        if info is None:
            break
        found = found or signal.Signals(info.si_signo)
    return found


def discard() -> None:
    """Unblock them, dropping any that came while held (a process that never got to
    handle them, and is about to exit, must not die of one instead)."""
    pending = signal.sigpending() & _ALL
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in pending}
    release()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold them for the block (the serving code releases them once its handlers are
    in); whatever is still held at its end is dropped."""
    hold()
    try:
        yield
    finally:
        discard()
