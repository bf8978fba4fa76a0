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
from aecho.process.pidfile import Probe, probe, process_title, remove_if_stale
from aecho.process.titles import address_from_title

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
        return f"not running (no pidfile at {path})"
    gone = f"pid {found.pid} is gone" if found.pid else "no pid in it"
    return f"not running (stale pidfile {path}: {gone})"


def _refuse(path: str, found: Probe) -> Outcome:
    return Outcome(
        1,
        f"pidfile {path} does not name the server that holds it: {found.why}; "
        "nothing was signalled",
        error=True,
    )


def stop(path: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> Outcome:
    """SIGTERM the server named by the pidfile and wait; SIGKILL past ``timeout``.

    Exit 0 once it is gone or when nothing was running (stopping a stopped service
    succeeds, as LSB init scripts do); 1 when it cannot be stopped or checked.
    """
    try:
        found = probe(path)
    except OSError as exc:
        return Outcome(1, f"cannot read pidfile {path}: {exc.strerror}", error=True)
    if found.state == "starting":
        return Outcome(1, f"the server for {path} is still starting; retry", error=True)
    if found.state == "foreign":
        return _refuse(path, found)
    if found.state != "running" or found.pid is None:
        return Outcome(0, _not_running(path, found))
    pid = found.pid
    # A pidfd pins the process: the check below and the signal reach the same one.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return Outcome(0, f"stopped (pid {pid} had already exited)")
    try:
        again = probe(path)
        if again.state != "running" or again.pid != pid:
            return Outcome(1, f"pidfile {path} changed while stopping; retry", error=True)
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
    return Outcome(
        0,
        f"pid {pid} did not stop within {timeout:g}s after SIGTERM; killed it (SIGKILL)",
        error=True,
    )


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
                title = process_title(int(entry)).decode("utf-8", "replace")
                if address_from_title(title):
                    found.append((title, int(entry)))
    return [f"pid {child} {title}" for title, child in sorted(found)]


def status(path: str) -> Outcome:
    """Whether the server named by the pidfile runs: 0 running, 3 not (LSB), 4 unknown."""
    try:
        found = probe(path)
    except OSError as exc:
        return Outcome(UNKNOWN, f"status unknown: cannot read pidfile {path}: {exc.strerror}")
    if found.state == "starting":
        return Outcome(RUNNING, f"starting (pidfile {path} is locked, no pid written yet)")
    if found.state == "foreign":
        return Outcome(1, f"pidfile {path} does not name the server that holds it: {found.why}")
    if found.state != "running" or found.pid is None:
        return Outcome(NOT_RUNNING, _not_running(path, found))
    parts = [f"running, pid {found.pid}"]
    title = process_title(found.pid).decode("utf-8", "replace")
    if address := address_from_title(title):
        parts.append(f"serving on {address}")
    if (since := started_at(found.pid)) is not None:
        parts.append(f"up {format_uptime(time.time() - since)}")
    lines = [", ".join(parts)]
    lines += [f"  {w}" for w in workers_of(found.pid)]
    return Outcome(RUNNING, "\n".join(lines))
