"""systemd integration: sd_notify over a real datagram socket, and socket activation."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aecho.process.systemd import NotifyReceiver
from tests.conftest import echo_once, wait_until

TIMEOUT = 30.0
ACTIVATED = b"activated\x00\xff"


@contextlib.contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """A datagram socket bound where ``NOTIFY_SOCKET=address`` points."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_then_stopping(serve_process, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    address = str(tmp_path / "notify") if kind == "path" else f"@aecho-test-{uuid.uuid4().hex}"
    with notify_socket(address) as sock:
        srv = serve_process(env={"NOTIFY_SOCKET": address})
        ready = sock.recv(4096).decode().split("\n")
        assert ready[0] == "READY=1"
        listen = [f for f in ready if f.startswith("X_AECHO_LISTEN=127.0.0.1:")]
        assert len(listen) == 1, ready
        port = int(listen[0].rsplit(":", 1)[1])
        assert f"STATUS=serving on 127.0.0.1:{port}" in ready
        assert srv.stop() == 0
        assert sock.recv(4096) == b"STOPPING=1"


class Spawned:
    """A command that ends by exec'ing ``aecho serve``, with a private NOTIFY_SOCKET."""

    def __init__(self, cmd: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        self.notify = NotifyReceiver()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
            env={**os.environ, **self.notify.env},
        )
        self.lines: list[str] = []
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_ready(self) -> bool:
        """Wait for READY=1 (False if the process exits first); sets :attr:`port`."""
        note = self.notify.wait_ready(TIMEOUT, lambda: self.proc.poll() is not None)
        if note is not None:
            self.port = note.port
        return note is not None

    def wait_for(self, pattern: str) -> bool:
        """Wait until a line matches ``pattern`` (or the process ends)."""

        def seen() -> bool:
            return any(re.search(pattern, line) for line in list(self.lines))

        def ended() -> bool:
            return self.proc.poll() is not None and not self._reader.is_alive()

        wait_until(lambda: seen() or ended(), timeout=TIMEOUT, interval=0.05)
        return seen()

    def finish(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(TIMEOUT)
        finally:
            self.notify.close()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def with_listen_env(
    fd: int | tuple[int, ...], listen_pid: str = "self", listen_fds: str = "1"
) -> list[str]:
    """A wrapper that puts ``fd`` (several: from 3 on), sets LISTEN_* for its own pid,
    then execs aecho."""
    pid_expr = "str(os.getpid())" if listen_pid == "self" else repr(listen_pid)
    fds = (fd,) if isinstance(fd, int) else fd
    code = (
        "import os, sys\n"
        + "".join(f"os.dup2({f}, {3 + i})\n" for i, f in enumerate(fds))
        + f"os.environ['LISTEN_PID'] = {pid_expr}\n"
        + f"os.environ['LISTEN_FDS'] = {listen_fds!r}\n"
        + "os.execv(sys.executable, [sys.executable, '-m', 'aecho', *sys.argv[1:]])\n"
    )
    return [sys.executable, "-c", code]


def test_socket_passed_by_the_caller_is_used() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # --port 9 would need privileges: proof that nothing was bound but the inherited socket.
        proc = Spawned(
            [*with_listen_env(listener.fileno()), "serve", "--port", "9"],
            pass_fds=(listener.fileno(),),
        )
    try:
        assert proc.wait_ready(), proc.output
        assert proc.port == port
        assert echo_once(port, ACTIVATED) == ACTIVATED
    finally:
        assert proc.finish() == 0, proc.output


def _udp_echo(port: int, payload: bytes = b"datagram\x00") -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None


def test_udp_under_socket_activation_answers_on_the_activated_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = Spawned(
            [*with_listen_env(listener.fileno()), "serve", "--port", "9", "--udp"],
            pass_fds=(listener.fileno(),),
        )
    try:
        assert proc.wait_ready(), proc.output
        assert echo_once(port, ACTIVATED) == ACTIVATED
        assert _udp_echo(port) == b"datagram\x00"
    finally:
        assert proc.finish() == 0, proc.output


def test_udp_socket_passed_by_activation_is_answered() -> None:
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        udp.bind(("127.0.0.1", 0))
        udp_port = udp.getsockname()[1]
        proc = Spawned(
            [
                *with_listen_env((listener.fileno(), udp.fileno()), listen_fds="2"),
                *("serve", "--port", "9", "--udp"),
            ],
            pass_fds=(listener.fileno(), udp.fileno()),
        )
    try:
        assert proc.wait_ready(), proc.output
        assert _udp_echo(udp_port) == b"datagram\x00"
    finally:
        assert proc.finish() == 0, proc.output


def test_listen_pid_for_another_process_is_ignored() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        proc = Spawned(
            [*with_listen_env(listener.fileno(), listen_pid="1"), "serve", "--port", "0"],
            pass_fds=(listener.fileno(),),
        )
        try:
            assert proc.wait_ready(), proc.output
            assert proc.port != listener.getsockname()[1]
            assert echo_once(proc.port, ACTIVATED) == ACTIVATED
        finally:
            assert proc.finish() == 0, proc.output


@pytest.mark.parametrize(
    ("listen_fds", "message"),
    [
        ("many", "socket activation: LISTEN_PID="),
        ("1", "socket activation: descriptor 3 is not a listening stream socket"),
    ],
)
def test_unusable_activation_is_one_line(listen_fds: str, message: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as not_listening:
        proc = Spawned(
            [*with_listen_env(not_listening.fileno(), listen_fds=listen_fds), "serve"],
            pass_fds=(not_listening.fileno(),),
        )
        proc.proc.wait(TIMEOUT)
        rc = proc.finish()
    assert rc == 1
    assert proc.output.startswith(f"aecho: error: {message}"), proc.output
    assert proc.output.count("\n") == 1


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_systemd_socket_activate() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    proc = Spawned(
        [
            tool,
            "-l",
            f"127.0.0.1:{port}",
            "-E",
            "NOTIFY_SOCKET",
            sys.executable,
            "-m",
            "aecho",
            "serve",
            "--port",
            "9",
        ]
    )
    try:
        # The tool binds first and execs the server on the first connection.
        assert proc.wait_for(rf"Listening on 127\.0\.0\.1:{port}"), proc.output
        assert echo_once(port, ACTIVATED) == ACTIVATED
        assert proc.wait_ready(), proc.output
        assert proc.port == port
        assert echo_once(port, b"second") == b"second"
    finally:
        assert proc.finish() == 0, proc.output


def test_deploy_units_are_consistent() -> None:
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    service = (deploy / "aecho.service").read_text()
    sock = (deploy / "aecho.socket").read_text()
    assert re.search(r"^Type=notify$", service, re.M)
    assert re.search(r"^ExecStart=\S*aecho serve", service, re.M)
    assert re.search(r"^ListenStream=127\.0\.0\.1:7007$", sock, re.M)
