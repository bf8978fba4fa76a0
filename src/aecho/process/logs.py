"""Log set-up, reopening log files on SIGUSR1, and where a daemon's stdio goes."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys

log = logging.getLogger("aecho.process")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogLevel(enum.StrEnum):
    """``--log-level``, most verbose first."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


def more_verbose(level: str, steps: int) -> str:
    """``level`` lowered by ``steps`` (``-v`` each), stopping at debug."""
    order = list(LogLevel)
    index = order.index(LogLevel(level.lower()))
    return order[max(0, index - steps)].value


def open_std_fds() -> None:
    """Put /dev/null on whichever of descriptors 0, 1 and 2 is closed.

    Started with one of them closed, a process hands its number to the next file it
    opens, a log file or a listener, and a daemon's redirection of its stdio would then
    replace that file with /dev/null.

    Raises:
        OSError: /dev/null cannot be opened.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # stdio, for the programs it starts as well


def setup_logging(level: str, log_file: str | None = None) -> None:
    """Log at ``level`` to ``log_file`` (appending), or to stderr.

    Raises:
        OSError: the log file cannot be opened.
    """
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def open_log(path: str) -> int:
    """A descriptor appending to ``path``.

    Raises:
        OSError: it cannot be opened.
    """
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def redirect_stdio(log_file: str | None) -> None:
    """stdin from /dev/null; stdout and stderr to the log file or /dev/null.

    Raises:
        OSError: /dev/null or the log file cannot be opened.
    """
    null = os.open(os.devnull, os.O_RDWR)
    out = open_log(log_file) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def log_file_fds() -> set[int]:
    """Descriptors of the log files in use (a daemon keeps them when it closes the rest)."""
    fds = set()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                fds.add(handler.stream.fileno())
    return fds


def reopen_log_files(redirect: bool = False) -> bool:
    """Reopen the log file by name (after rotation by rename).

    With ``redirect`` (a daemon), stdout and stderr follow the log file too.
    Failures are logged; the old file stays in use.  Returns whether there was a
    log file to reopen.
    """
    found = False
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        found = True
        try:
            # Append, whatever the original mode: the point is to follow a rename.
            stream = open(handler.baseFilename, "a", encoding=handler.encoding)  # noqa: SIM115
        except OSError as exc:
            log.error("cannot reopen log file %s: %s", handler.baseFilename, exc.strerror)
            continue
        old = handler.setStream(stream)
        if old is not None:
            old.close()
        if redirect:
            fd = stream.fileno()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
    return found
