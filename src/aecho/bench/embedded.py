"""The embedded server: ``aecho serve --port 0`` in a subprocess, for a bench with no
HOST/PORT.  Started and stopped here; never imported (bench does not import the server)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from aecho.bench import BenchError
from aecho.config import BenchConfig

LISTENING = re.compile(r"listening on (\[[^\]]+\]|[^\s:]+):(\d+)")


@contextlib.contextmanager
def embedded_server(
    cfg: BenchConfig, ready_timeout: float = 60.0
) -> Iterator[tuple[str, int, int]]:
    """``aecho serve --port 0`` in a subprocess; yields its (host, port, pid), then stops it.

    Raises:
        BenchError: the server exited or did not report readiness in time.
    """
    args = [
        sys.executable,
        "-m",
        "aecho",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--offload",
        cfg.offload.value,
        "--handler",
        cfg.handler,
        "--framing",
        cfg.framing.value,
        "--max-connections",
        str(max(cfg.connections + 16, 10_000)),
        "--log-level",
        "info",
    ]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as logf:
        # A new session: Ctrl-C at the terminal is for bench, which then stops the server itself.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            start_new_session=True,
        )
        try:
            host, port = _wait_listening(proc, logf, ready_timeout)
            yield host, port, proc.pid
        finally:
            _stop_server(proc)


def _wait_listening(proc: subprocess.Popen[bytes], logf: Any, timeout: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        logf.seek(0)
        text = logf.read()
        if m := LISTENING.search(text):
            return m.group(1).strip("[]"), int(m.group(2))
        if proc.poll() is not None:
            last = [line for line in text.splitlines() if line.strip()]
            why = last[-1] if last else f"exit status {proc.returncode}"
            raise BenchError(f"the embedded server did not start: {why}")
        if time.monotonic() > deadline:
            raise BenchError(f"the embedded server did not report readiness in {timeout:g}s")
        # The readiness line is written to a file, so poll it (briefly) for the line.
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
