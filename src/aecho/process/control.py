"""``aecho stop`` and ``aecho status``: outcomes with their exit codes; cli prints them.

Nothing is signalled unless the pidfile's pid holds the pidfile's lock and is an
aecho server (see ``process.pidfile``): a rewritten pidfile or a reused pid never
gets anyone else killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from aecho.process.daemon import wait_gone
from aecho.process.pidfile import (
    POLL_S,
    Probe,
    pid_alive,
    probe,
    process_title,
    remove_if_stale,
)
from aecho.process.titles import address_from_title
from aecho.text import printable

DEFAULT_STOP_TIMEOUT = 15.0

# LSB exit codes for status.
RUNNING, NOT_RUNNING, UNKNOWN = 0, 3, 4


@dataclass(frozen=True)
class Outcome:
    """What to tell the user, where (stdout unless ``error``), and the exit code."""

    code: int
    message: str
    error: bool = False


def _not_running(path: str, found: Probe) -> str:
    if found.state == "absent":
        return f"not running (no pidfile at {printable(path)})"
    if found.why:
        why = found.why
    elif found.pid is None:
        why = "no pid in it"
    elif pid_alive(found.pid):
        why = f"pid {found.pid} is not an aecho server"
    else:
        why = f"pid {found.pid} is gone"
    return f"not running (stale pidfile {printable(path)}: {why})"


def _addresses(pid: int) -> list[str]:
    """The addresses ``pid``'s process title says it serves on."""
    return address_from_title(printable(process_title(pid).decode("utf-8", "replace"))).split()


def _refuse(path: str, found: Probe) -> Outcome:
    return Outcome(
        1,
        f"pidfile {printable(path)} does not name the server that holds it: {found.why}; "
        "nothing was signalled",
        error=True,
    )


def _elsewhere(path: str, pid: int, port: int | None, unix: str | None) -> Outcome | None:
    """A refusal when the server a default pidfile names serves somewhere else."""
    if port is None and unix is None:
        return None
    addresses = _addresses(pid)
    if unix is not None and os.path.abspath(unix) in addresses:
        return None
    if unix is None and any(a.rsplit(":", 1)[-1] == str(port) for a in addresses):
        return None
    where = " ".join(addresses) or "unknown"
    asked = os.path.abspath(unix) if unix else f"port {port}"
    return Outcome(
        1,
        f"pidfile {printable(path)} names pid {pid}, which serves on {where}, not on {asked}; "
        "nothing was signalled",
        error=True,
    )


def _probe_once_written(path: str, timeout: float) -> Probe:
    """Probe the pidfile; while a starting server holds it locked and empty, probe again,
    up to ``timeout``, until its pid is in it (or the server is gone).

    Raises:
        OSError: the pidfile cannot be read.
    """
    deadline = time.monotonic() + timeout
    found = probe(path)
    while found.state == "starting" and time.monotonic() < deadline:
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        found = probe(path)
    return found


def stop(
    path: str,
    timeout: float = DEFAULT_STOP_TIMEOUT,
    port: int | None = None,
    unix: str | None = None,
) -> Outcome:
    """SIGTERM the server named by the pidfile and wait; SIGKILL past ``timeout``.

    A pidfile locked by a server that has not written its pid yet (it is starting) is
    waited on for up to ``timeout`` first: the pid is signalled once it is there.

    ``port`` or ``unix``: the pidfile was found from them, and the server must serve
    there.  Exit 0 once it is gone or when nothing was running (stopping a stopped
    service succeeds, as LSB init scripts do); 1 when it cannot be stopped or checked.
    """
    try:
        found = _probe_once_written(path, timeout)
    except OSError as exc:
        return Outcome(1, f"cannot read pidfile {printable(path)}: {exc.strerror}", error=True)
    if found.state == "starting":
        return Outcome(
            1,
            f"pidfile {printable(path)} is locked by pid {found.holder}, a server still "
            f"starting that wrote no pid within {timeout:g}s; nothing was signalled",
            error=True,
        )
    if found.state == "foreign":
        return _refuse(path, found)
    if found.state == "unlocked":
        return Outcome(
            1,
            f"pidfile {printable(path)}: {found.why}; nothing was signalled (if it is yours, "
            f"kill {found.pid} stops it gracefully)",
            error=True,
        )
    if found.state != "running" or found.pid is None:
        return Outcome(0, _not_running(path, found))
    pid = found.pid
    if (refusal := _elsewhere(path, pid, port, unix)) is not None:
        return refusal
    socket_file = _socket_file(pid)
    # A pidfd pins the process: the check below and the signal reach the same one.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return Outcome(0, f"stopped (pid {pid} had already exited)")
    try:
        again = probe(path)
        if again.state != "running" or again.pid != pid:
            changed = f"pidfile {printable(path)} changed while stopping; retry"
            return Outcome(1, changed, error=True)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            return Outcome(0, f"stopped (pid {pid} had already exited)")
        except PermissionError:
            return Outcome(1, f"not allowed to signal pid {pid}: run as its user", error=True)
        if wait_gone(pid, timeout):
            return Outcome(0, f"stopped (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    wait_gone(pid, 5.0)
    remove_if_stale(path)
    if socket_file:
        _remove_if_stale_socket(socket_file)
    return Outcome(
        0,
        f"pid {pid} did not stop within {timeout:g}s after SIGTERM; killed it (SIGKILL)",
        error=True,
    )


def _socket_file(pid: int) -> str:
    """The Unix socket a server serves on (from its title), "" for TCP."""
    return next((a for a in _addresses(pid) if a.startswith("/")), "")


def _remove_if_stale_socket(path: str) -> None:
    """After SIGKILL the server left its socket file: remove it once nothing listens."""
    import stat

    from aecho.server.listeners import nothing_listens

    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode) and nothing_listens(path):
            os.unlink(path)


def format_uptime(seconds: float) -> str:
    s = int(max(seconds, 0))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def started_at(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def workers_of(pid: int) -> list[str]:
    """``pid N TITLE`` of each serving process a supervisor ``pid`` runs, in worker order."""
    found: list[tuple[str, int]] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                title = printable(process_title(int(entry)).decode("utf-8", "replace"))
                if address_from_title(title):
                    found.append((title, int(entry)))
    return [f"pid {child} {title}" for title, child in sorted(found)]


def status(path: str, port: int | None = None, unix: str | None = None) -> Outcome:
    """Whether the server named by the pidfile runs: 0 running, 3 not (LSB), 4 unknown,
    1 when the pidfile names a process that does not hold it or serves elsewhere."""
    try:
        found = probe(path)
    except OSError as exc:
        why = f"status unknown: cannot read pidfile {printable(path)}: {exc.strerror}"
        return Outcome(UNKNOWN, why, error=True)
    if found.state == "starting":
        locked = f"starting (pidfile {printable(path)} is locked, no pid written yet)"
        return Outcome(RUNNING, locked)
    if found.state == "foreign":
        why = f"pidfile {printable(path)} does not name the server that holds it: {found.why}"
        return Outcome(1, why, error=True)
    if found.state not in ("running", "unlocked") or found.pid is None:
        return Outcome(NOT_RUNNING, _not_running(path, found))
    if (refusal := _elsewhere(path, found.pid, port, unix)) is not None:
        return Outcome(1, refusal.message, error=True)
    parts = [f"running, pid {found.pid}"]
    title = printable(process_title(found.pid).decode("utf-8", "replace"))
    if address := address_from_title(title):
        parts.append(f"serving on {address}")
    if (since := started_at(found.pid)) is not None:
        parts.append(f"up {format_uptime(time.time() - since)}")
    lines = [", ".join(parts)]
    if found.state == "unlocked":
        replaced = f"  but pidfile {printable(path)} is not locked by it (was the file replaced?)"
        lines.append(replaced)
    lines += [f"  {w}" for w in workers_of(found.pid)]
    return Outcome(RUNNING, "\n".join(lines))
