"""``--handler package.module:function`` from the working directory, in the server, a daemon
and pool workers; what a missing module's error says; handler tracebacks at debug level.

``PYTHONSAFEPATH=1`` keeps ``python -m aecho`` from putting the working directory on
``sys.path`` itself, as the ``aecho`` console script does not: the tests then see what a
user of the installed command sees.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aecho.process.pidfile import parse_pid, pid_alive
from tests.conftest import ServerProcess, round_trip, wait_until

ROOT = Path(__file__).resolve().parent.parent
SAFE = {"PYTHONSAFEPATH": "1"}
TIMEOUT = 60.0
SHOUT = "def shout(data):\n    return data.upper() + b'!'\n"
BOOM = (
    "def boom(data):\n"
    "    if data.startswith(b'boom'):\n"
    "        raise ValueError('refused ' + repr(data))\n"
    "    return data\n"
)


def exchange(port: int, payload: bytes, expect: int) -> bytes:
    """Send ``payload``; read until ``expect`` reply lines came back (or the peer closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        return round_trip(sock, payload, lines=expect)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding the user's handler modules, made the working directory."""
    (tmp_path / "shout_mod.py").write_text(SHOUT)
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "boomer.py").write_text(BOOM)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("offload", ["inline", "process"])
def test_handler_module_from_the_working_directory(
    project: Path, serve_process: Callable[..., ServerProcess], offload: str
) -> None:
    args = ["--framing", "line", "--offload", offload, "--pool-size", "1"]
    server = serve_process("--handler", "shout_mod:shout", *args, env=SAFE)
    assert exchange(server.port, b"hi\nthere\n", 2) == b"HI!\nTHERE!\n"


@pytest.mark.parametrize("offload", ["inline", "process"])
def test_a_missing_module_says_where_it_was_looked_for(project: Path, offload: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--port", "0", "--offload", offload,
         "--handler", "no_such_mod:f"],
        env={**os.environ, **SAFE}, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == (
        "aecho: error: cannot import handler module 'no_such_mod': no module named "
        f"'no_such_mod' in {project} (the working directory), on PYTHONPATH or among the "
        "installed packages\n"
    )


def test_a_module_that_fails_inside_names_its_own_error(project: Path) -> None:
    (project / "broken_mod.py").write_text("import no_such_dependency\n")
    out = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--port", "0", "--handler", "broken_mod:f"],
        env={**os.environ, **SAFE}, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == (
        "aecho: error: cannot import handler module 'broken_mod': "
        "ModuleNotFoundError: No module named 'no_such_dependency'\n"
    )


@pytest.fixture
def pidfiles() -> Iterator[list[Path]]:
    """Pidfiles of daemons a test starts: each one's daemon is killed at teardown."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        with contextlib.suppress(OSError, TypeError):
            pid = parse_pid(path.read_text())
            if pid is not None and pid_alive(pid):
                os.kill(pid, 9)


def test_daemon_imports_handlers_from_where_it_was_started(
    project: Path, pidfiles: list[Path]
) -> None:
    pidfile = project / "d.pid"
    pidfiles.append(pidfile)
    out = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--daemon", "--port", "0",
         "--pidfile", str(pidfile), "--framing", "line", "--offload", "process",
         "--pool-size", "1", "--handler", "shout_mod:shout"],
        env={**os.environ, **SAFE}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = re.match(r"aecho serving on 127\.0\.0\.1:(\d+) \(pid (\d+), ", out.stdout)
    assert m, out.stdout
    assert os.readlink(f"/proc/{m.group(2)}/cwd") == "/"  # the daemon left the directory
    assert exchange(int(m.group(1)), b"from a daemon\n", 1) == b"FROM A DAEMON!\n"


@pytest.mark.parametrize("offload", ["inline", "process"])
def test_debug_log_shows_the_handler_traceback(
    project: Path, serve_process: Callable[..., ServerProcess], offload: str
) -> None:
    args = ["--framing", "line", "--offload", offload, "--pool-size", "1"]
    server = serve_process(
        "--handler", "mypkg.boomer:boom", "--log-level", "debug", *args, env=SAFE
    )
    got = exchange(server.port, b"ok\nboom now\nok again\n", 3)
    assert got == b"ok\nERR ValueError: refused b'boom now'\nok again\n"
    assert wait_until(lambda: "raise ValueError" in server.output, TIMEOUT), server.output
    text = server.output
    assert "Traceback (most recent call last)" in text
    assert re.search(r'File ".*mypkg/boomer\.py", line 3, in boom', text), text


def test_info_log_has_one_line_per_handler_error(
    project: Path, serve_process: Callable[..., ServerProcess]
) -> None:
    args = ["--framing", "line", "--offload", "process", "--pool-size", "1"]
    server = serve_process("--handler", "mypkg.boomer:boom", *args, env=SAFE)
    assert exchange(server.port, b"boom\n", 1) == b"ERR ValueError: refused b'boom'\n"
    assert wait_until(lambda: "failed for" in server.output, TIMEOUT)
    line = next(x for x in server.output.splitlines() if "failed for" in x)
    assert re.search(
        r"WARNING aecho\.\S+: handler mypkg\.boomer:boom failed for 127\.0\.0\.1:\d+: "
        r"ValueError: refused b'boom'$",
        line,
    ), line
    assert "Traceback" not in server.output
