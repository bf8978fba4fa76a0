"""Shared plumbing for the benchmarks: build the C load generator, start servers, take medians.

Benchmarks are scripts, not tests: they print tables and ratios measured side by side in
one run.  Every server here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin"
VENV = HERE.parent / ".venv"


def _in_the_project_environment() -> None:
    """Re-run the script with the project's ``.venv`` when aecho is not importable here.

    Every server and load generator is started with ``sys.executable``, so a Python
    without aecho (the system's, say) would only fail later, with a traceback.
    """
    if importlib.util.find_spec("aecho") is not None:
        return
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), *sys.argv])
    sys.exit(
        f"{Path(sys.argv[0]).name}: aecho is not installed for {sys.executable}: set up "
        "the project as README.md says, then run .venv/bin/python benchmarks/SCRIPT.py"
    )


_in_the_project_environment()

# Only now: the line above may have had to re-run this script where aecho is installed.
from aecho.process.systemd import NotifyReceiver  # noqa: E402


def build_c(name: str) -> Path:
    """Compile benchmarks/NAME.c once (gcc -O2) and return the binary's path."""
    src = HERE / f"{name}.c"
    exe = BIN / name
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BIN.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def loadgen_path() -> Path:
    """The compiled C load generator (benchmarks/loadgen.c)."""
    return build_c("loadgen")


def run_loadgen(
    port: int,
    connections: int,
    size: int,
    duration: float,
    warmup: float = 1.0,
    pipeline: int = 1,
    host: str = "127.0.0.1",
    cpu: int | None = None,
) -> dict[str, Any]:
    """Drive an echo server with the C load generator; return its JSON result.

    ``cpu`` pins the load generator to that CPU (taskset).  The result gains ``wall_s`` (the
    loadgen's whole life: connect, warm-up, measurement) and ``loadgen_cpu_s`` (its user+sys
    CPU time), so a caller can show whether the load generator had headroom.
    """
    cmd = loadgen_cmd(port, connections, size, duration, warmup, pipeline, host, cpu)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, check=False, timeout=duration + warmup + 60)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0 and not out.stdout:
        raise RuntimeError(f"loadgen failed: {out.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out.stdout)
    result["wall_s"] = wall
    result["loadgen_cpu_s"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    return result


def loadgen_cmd(
    port: int,
    connections: int,
    size: int,
    duration: float,
    warmup: float = 1.0,
    pipeline: int = 1,
    host: str = "127.0.0.1",
    cpu: int | None = None,
) -> list[str]:
    """The command line of one load generator run (pinned to ``cpu`` if given)."""
    cmd = [str(loadgen_path()), host, str(port), "-c", str(connections), "-s", str(size)]
    cmd += ["-d", str(duration), "-w", str(warmup), "-p", str(pipeline)]
    return pinned(cmd, cpu)


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run under ``taskset -c CPU`` (taskset execs, so the pid is the command's)."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], timeout: float = 30.0, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start a server and wait for its READY=1 on a private NOTIFY_SOCKET (the sd_notify
    protocol); yield it and the TCP port its READY named, then stop it with SIGTERM.
    ``env`` is added to this process's environment for the server.

    ``aecho serve``, the reference servers and ``echo_epoll.c`` all announce readiness so.

    Raises:
        RuntimeError: the server exited or did not become ready within ``timeout``.
    """
    with tempfile.TemporaryFile() as log, NotifyReceiver() as notify:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), **notify.env},
        )
        try:
            note = notify.wait_ready(timeout, exited=lambda: proc.poll() is not None)
            if note is None:
                log.seek(0)
                said = log.read().decode(errors="replace").strip()
                raise RuntimeError(f"server {list(argv)} did not become ready: {said}")
            yield proc, note.port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def aecho_serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "aecho", "serve", "--port", "0", "--log-level", "info", *args]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cpu_seconds(pid: int) -> float:
    """User+system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def settle(seconds: float = 0.5) -> None:
    """Let the previous run's sockets drain before the next measurement."""
    time.sleep(seconds)


def cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per-CPU ``(busy, steal, total)`` jiffies since boot (Linux /proc/stat).

    Busy includes softirq time, which on loopback TCP is where much of the delivery work
    lands and which no process's own CPU time shows.  Steal is time the hypervisor gave to
    other guests: the noise this process cannot see.
    """
    out: dict[int, tuple[int, int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(x) for x in rest]
        idle, steal = v[3] + v[4], v[7]
        total = sum(v[:8])
        out[int(name[3:])] = (total - idle - steal, steal, total)
    return out


def cpu_busy_pct(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]]
) -> dict[int, tuple[float, float]]:
    """Per-CPU ``(busy %, steal %)`` between two :func:`cpu_times` snapshots."""
    pct: dict[int, tuple[float, float]] = {}
    for cpu, (busy1, steal1, total1) in after.items():
        busy0, steal0, total0 = before[cpu]
        span = max(total1 - total0, 1)
        pct[cpu] = (100.0 * (busy1 - busy0) / span, 100.0 * (steal1 - steal0) / span)
    return pct
