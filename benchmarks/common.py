"""Shared plumbing for the benchmarks: build the C load generator, start servers, take medians.

Benchmarks are scripts, not tests: they print tables and ratios measured side by side in
one run.  Every server here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin"
LISTENING = re.compile(rb"listening on (?:\[[^\]]+\]|[^\s:]+):(\d+)")


def loadgen_path() -> Path:
    """Compile benchmarks/loadgen.c once (gcc -O2) and return the binary's path."""
    src = HERE / "loadgen.c"
    exe = BIN / "loadgen"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BIN.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def run_loadgen(
    port: int,
    connections: int,
    size: int,
    duration: float,
    warmup: float = 1.0,
    pipeline: int = 1,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """Drive an echo server with the C load generator; return its JSON result."""
    cmd = [str(loadgen_path()), host, str(port), "-c", str(connections), "-s", str(size)]
    cmd += ["-d", str(duration), "-w", str(warmup), "-p", str(pipeline)]
    out = subprocess.run(cmd, capture_output=True, check=False, timeout=duration + warmup + 60)
    if out.returncode != 0 and not out.stdout:
        raise RuntimeError(f"loadgen failed: {out.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], ready_pattern: re.Pattern[bytes] = LISTENING, timeout: float = 30.0
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start a server whose stderr (or stdout) announces ``listening on HOST:PORT``."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    port_box: list[int] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not port_box and (m := ready_pattern.search(line)):
                port_box.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        if not ready.wait(timeout) or not port_box:
            raise RuntimeError(f"server {argv} did not become ready")
        yield proc, port_box[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


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
