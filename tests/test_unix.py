"""Unix domain sockets: mode, stale-socket takeover, live-socket refusal, bad paths."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="aecho-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _unix_server(path: Path, *args: str) -> subprocess.Popen[str]:
    # conftest's ServerProcess waits for "listening on HOST:PORT"; this logs a path.
    return subprocess.Popen(
        [sys.executable, "-m", "aecho", "serve", "--unix", str(path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_listening(proc: subprocess.Popen[str], path: Path) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"listening on {path}" in line:
            return
    raise AssertionError(f"server exited: rc={proc.wait()}")


def _echo(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.terminate()
    rc = proc.wait(30)
    assert proc.stderr is not None
    proc.stderr.close()
    return rc


@pytest.mark.parametrize(("args", "mode"), [((), 0o660), (("--unix-mode", "0600"), 0o600)])
def test_unix_echo_and_mode(short_dir: Path, args: tuple[str, ...], mode: int) -> None:
    path = short_dir / "s"
    proc = _unix_server(path, *args)
    try:
        _wait_listening(proc, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        payload = os.urandom(200_000) + b"\x00\n"
        assert _echo(path, payload) == payload
    finally:
        assert _stop(proc) == 0
    assert not path.exists()  # removed on a clean stop


def test_client_over_unix(short_dir: Path) -> None:
    path = short_dir / "s"
    proc = _unix_server(path)
    try:
        _wait_listening(proc, path)
        res = subprocess.run(
            [sys.executable, "-m", "aecho", "client", "--unix", str(path)],
            input=b"over unix\n",
            capture_output=True,
            timeout=60,
        )
        assert (res.returncode, res.stdout) == (0, b"over unix\n")
    finally:
        _stop(proc)


def test_stale_socket_replaced_live_one_refused(short_dir: Path) -> None:
    path = short_dir / "s"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nothing listens
    proc = _unix_server(path)
    try:
        _wait_listening(proc, path)
        assert _echo(path, b"took over") == b"took over"
        second = subprocess.run(
            [sys.executable, "-m", "aecho", "serve", "--unix", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "already listening" in second.stderr and second.stderr.count("\n") == 1
        assert _echo(path, b"first still serves") == b"first still serves"
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("missing-dir/s", "does not exist"),
        ("file", "not a socket"),
        ("x" * 120, "too long"),
    ],
)
def test_bad_unix_paths_one_line(short_dir: Path, where: str, needle: str) -> None:
    (short_dir / "file").write_text("precious")
    res = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--unix", str(short_dir / where)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
    assert (short_dir / "file").read_text() == "precious"


def test_unwritable_directory_one_line(short_dir: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys/aecho.sock")  # root writes anywhere but sysfs
    else:
        locked = short_dir / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "s"
    res = subprocess.run(
        [sys.executable, "-m", "aecho", "serve", "--unix", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "cannot listen on" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("mode", ["rw", "0999", "1777"])
def test_bad_unix_mode(short_dir: Path, mode: str) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "aecho",
            "serve",
            "--unix",
            str(short_dir / "s"),
            "--unix-mode",
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--unix-mode" in res.stderr, res.stderr
