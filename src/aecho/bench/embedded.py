"""The embedded server: ``aecho serve --port 0`` in a subprocess, for a bench with no
HOST/PORT.  Started and stopped here; never imported (bench does not import the server)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import IO

from aecho.bench.errors import BenchError
from aecho.config import DEFAULT_HOST, DEFAULT_MAX_CONNECTIONS, BenchConfig
from aecho.process.systemd import NotifyReceiver


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
        DEFAULT_HOST,
        "--port",
        "0",
        "--offload",
        cfg.offload.value,
        "--handler",
        cfg.handler,
        "--framing",
        cfg.framing.value,
        "--max-connections",
        str(max(cfg.connections + 16, DEFAULT_MAX_CONNECTIONS)),
        "--log-level",
        "info",
    ]
    with (
        tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as logf,
        NotifyReceiver() as notify,
    ):
        # A new session: Ctrl-C at the terminal is for bench, which then stops the server itself.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            env={**os.environ, **notify.env},
            start_new_session=True,
        )
        try:
            host, port = _wait_ready(proc, notify, logf, ready_timeout)
            yield host, port, proc.pid
        finally:
            _stop_server(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes], notify: NotifyReceiver, logf: IO[str], timeout: float
) -> tuple[str, int]:
    """The TCP address the server announced with READY=1 on its notify socket.

    Raises:
        BenchError: the server exited first (with its last log line) or took too long.
    """
    note = notify.wait_ready(timeout, exited=lambda: proc.poll() is not None)
    if note is not None:
        for address in note.addresses:
            if isinstance(address, tuple):
                return address
        raise BenchError("the embedded server announced no TCP address")
    if proc.poll() is not None:
        logf.seek(0)
        last = [line for line in logf.read().splitlines() if line.strip()]
        why = last[-1] if last else f"exit status {proc.returncode}"
        raise BenchError(f"the embedded server did not start: {why}")
    raise BenchError(f"the embedded server did not report readiness in {timeout:g}s")


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
