"""Log lines and messages as an operator reads them: peers as ``host:port`` /
``[v6]:port``, never a Python tuple; counts with the right plural; install hints that
work from a clone."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from aecho.text import plural
from tests.conftest import (
    ServerProcess,
    closed_without_reply,
    round_trip,
    running_server,
    until,
    wait_until,
)

TIMEOUT = 30.0


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, "0 connections"), (1, "1 connection"), (2, "2 connections")],
)
def test_plural(count: int, expected: str) -> None:
    assert plural(count, "connection") == expected
    assert plural(count, "worker process", "worker processes").endswith(
        "process" if count == 1 else "processes"
    )


@pytest.mark.asyncio
async def test_refused_peer_is_written_as_an_address(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--host", "::1", "--max-connections-per-ip", "1", "--log-level", "debug")
    with socket.create_connection(("::1", server.port), timeout=TIMEOUT) as first:
        assert round_trip(first, b"ping") == b"ping"
        assert await closed_without_reply(server.port, host="::1")
        assert wait_until(lambda: "refusing " in server.output, TIMEOUT)
    line = next(x for x in server.output.splitlines() if "refusing " in x)
    assert re.search(r"refusing \[::1\]:\d+: 1 connection open from ::1$", line), line


def test_one_worker_and_one_connection_are_singular(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--offload", "process", "--pool-size", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        assert round_trip(sock, b"ping") == b"ping"
        assert server.stop() == 0
    assert "offload: 1 worker process (forkserver)" in server.output
    assert "stopped: 1 connection open at stop, 0 cut at the grace deadline" in server.output


@pytest.mark.parametrize(
    ("args", "option", "module", "extra"),
    [
        (
            ["serve", "--port", "0", "--metrics-port", "0"],
            "--metrics-port",
            "prometheus_client",
            "metrics",
        ),
        (["bench", "-n", "1", "--plot", "x.png"], "--plot", "matplotlib", "plot"),
    ],
)
def test_a_missing_extra_is_named_as_a_clone_installs_it(
    args: list[str], option: str, module: str, extra: str, tmp_path: Path
) -> None:
    # A module set to None in sys.modules cannot be imported: the extra is "missing".
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    out = subprocess.run(
        [sys.executable, "-m", "aecho", *args],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == (
        f"aecho: error: {option} needs {module}: run pip install -e '.[{extra}]' in aecho's "
        f"directory (or pip install {module})\n"
    )


@pytest.mark.asyncio
async def test_a_stop_forced_before_it_began_counts_what_it_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """TERM and INT in one instant: the force comes before the graceful stop has counted
    the connections, and the closing line still adds up."""
    caplog.set_level(logging.INFO, logger="aecho.server")
    async with running_server() as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await until(lambda: len(server.connections) == 1, "the connection to be accepted")
        server.request_stop()
        server.force_stop()
        await asyncio.wait_for(server.shutdown(), TIMEOUT)
        writer.close()
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped:")]
    assert stopped == ["stopped: 1 connection open at stop, 1 cut by a forced stop"]
