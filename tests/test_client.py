"""``aecho client``: byte-exact pipe mode, interactive mode on a pseudo-terminal, failures."""

from __future__ import annotations

import os
import pty
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ServerProcess


def aecho(*args: str) -> list[str]:
    return [sys.executable, "-m", "aecho", *args]


def test_pipe_mode_round_trips_a_binary_file(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = serve_process()
    data = random.Random(7).randbytes(10 * 1024 * 1024) + b"\x00\xff\n\r"
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with src.open("rb") as stdin:
        out = subprocess.run(
            aecho("client", "127.0.0.1", str(server.port)),
            stdin=stdin,
            capture_output=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    assert out.stderr == b""


def test_refused_connection_is_one_line_and_exit_1(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process()
    port = server.port
    assert server.stop() == 0  # now nothing listens on that port
    out = subprocess.run(
        aecho("client", "127.0.0.1", str(port)),
        input=b"x",
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 1
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1
    assert f"127.0.0.1:{port}" in lines[0]
    assert "connection refused" in lines[0]
    assert "Traceback" not in out.stderr.decode()


def test_unresolvable_host_is_one_line_and_exit_1() -> None:
    out = subprocess.run(
        aecho("client", "no-such-host.invalid", "7"), input=b"", capture_output=True, timeout=60
    )
    assert out.returncode == 1
    assert len(out.stderr.decode().splitlines()) == 1
    assert "no-such-host.invalid" in out.stderr.decode()


def _read_until(fd: int, token: bytes, timeout: float = 15.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while token not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


class Terminal:
    """``aecho client`` with a pseudo-terminal as its stdin, stdout and stderr."""

    def __init__(self, port: int) -> None:
        self.fd, child_end = pty.openpty()
        self.proc = subprocess.Popen(
            aecho("client", "127.0.0.1", str(port)),
            stdin=child_end,
            stdout=child_end,
            stderr=child_end,
            start_new_session=True,
        )
        os.close(child_end)

    def read_until(self, token: bytes, timeout: float = 15.0) -> bytes:
        return _read_until(self.fd, token, timeout)

    def finish(self) -> int:
        self.read_until(b"\x00", timeout=5)  # drain until the child closes the terminal
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.fd)


def test_interactive_mode_prompts_echoes_and_quits(
    serve_process: Callable[..., ServerProcess],
) -> None:
    term = Terminal(serve_process().port)
    try:
        assert b"client > " in term.read_until(b"client > ")
        os.write(term.fd, b"hello, terminal\n")
        screen = term.read_until(b"client > ")
        # The terminal echoes the typed line once; the server's echo is printed once more.
        assert screen.count(b"hello, terminal") == 2, screen
        os.write(term.fd, b"quit\n")
        assert term.finish() == 0
    finally:
        term.close()


def test_interactive_ctrl_d_ends_cleanly(serve_process: Callable[..., ServerProcess]) -> None:
    term = Terminal(serve_process().port)
    try:
        assert b"client > " in term.read_until(b"client > ")
        os.write(term.fd, b"\x04")  # Ctrl-D at an empty prompt
        assert term.finish() == 0
    finally:
        term.close()
