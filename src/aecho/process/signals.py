"""Operator signals held back while a serving process starts.

USR1 (reopen logs), HUP (reload), TTIN and TTOU (one serving process more or less) can
come at any moment: logrotate sends USR1 as soon as a pidfile names a process.  Before
a process has its handlers, their default actions would end it (USR1, HUP) or suspend
it (TTIN, TTOU).  ``aecho serve`` blocks them first thing; once its handlers are in
place it unblocks them, and one that came in the meantime is handled then.  The mask
is inherited through ``fork``, so a serving process forked by the supervisor holds them
too until its own loop has its handlers.  Import cost: ``signal`` alone.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

HELD = frozenset({signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU})


def hold() -> None:
    """Block the operator signals in this thread (and in whatever it forks)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def release() -> None:
    """Unblock them: one that came while they were held is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def discard() -> None:
    """Unblock them, dropping any that came while held (a process that never got to
    handle them, and is about to exit, must not die of one instead)."""
    pending = signal.sigpending() & HELD
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
