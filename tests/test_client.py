"""``aecho client``: byte-exact pipe mode, interactive mode on a pseudo-terminal, failures."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from aecho.client.connection import Plain
from aecho.client.pipe import _Pipe, _Stdin
from aecho.config import ClientConfig
from tests.conftest import ServerProcess, terminal

ServeProcess = Callable[..., ServerProcess]


def aecho(*args: str) -> list[str]:
    return [sys.executable, "-m", "aecho", *args]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: the kernel completes each handshake and takes
    what fits in its buffers, but nothing ever answers or reads."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


def test_pipe_mode_round_trips_a_binary_file(serve_process: ServeProcess, tmp_path: Path) -> None:
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


def test_host_port_in_one_argument(serve_process: ServeProcess) -> None:
    v4, v6 = serve_process(), serve_process("--host", "::1")
    for args in (
        [f"127.0.0.1:{v4.port}"],
        [f"localhost:{v4.port}"],
        [f"[::1]:{v6.port}"],
        ["::1", str(v6.port)],
    ):
        out = subprocess.run(
            aecho("client", *args), input=b"where\n", capture_output=True, timeout=60
        )
        assert (out.returncode, out.stdout, out.stderr) == (0, b"where\n", b""), args


def test_refused_connection_is_one_line_and_exit_1(serve_process: ServeProcess) -> None:
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


def _assert_no_reply_line(stderr: bytes, port: int, timeout: str) -> None:
    assert stderr.decode().splitlines() == [
        f"aecho: error: no reply from 127.0.0.1:{port} within {timeout} of the last byte sent "
        "(--timeout sets how long; 0 waits forever)"
    ]


@pytest.mark.parametrize("size", [6, 8 << 20], ids=["a-line", "more-than-it-buffers"])
def test_pipe_timeout_when_the_server_never_answers(silent_port: int, size: int) -> None:
    """Input ended or not, read by the server or not: silence past --timeout is one line."""
    started = time.monotonic()
    out = subprocess.run(
        aecho("client", "127.0.0.1", str(silent_port), "--timeout", "500ms"),
        input=b"x" * (size - 1) + b"\n",
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    _assert_no_reply_line(out.stderr, silent_port, "0.5s")
    assert 0.5 <= time.monotonic() - started < 30


@contextlib.contextmanager
def piped_client(*args: str, stdin: int | IO[bytes] = subprocess.PIPE) -> Iterator[Piped]:
    """``aecho client ARGS`` with its stdout and stderr (and stdin, unless given) on pipes.

    Killed at the end if still running; its pipes are closed either way.
    """
    with subprocess.Popen(
        aecho("client", *args), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            yield Piped(proc)
        finally:
            proc.kill()


class Piped:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc, self.stdout, self.stderr = proc, proc.stdout, proc.stderr

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def echo(self, line: bytes) -> bytes:
        """Send a line; the line the client prints back."""
        self.send(line)
        return self.stdout.readline()

    def finish(self, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Close stdin (after ``stdin``), wait; (exit status, rest of stdout, stderr)."""
        out, err = self.proc.communicate(stdin, timeout=30)
        return self.proc.returncode, out, err


def test_pipe_timeout_with_input_still_open(silent_port: int) -> None:
    with piped_client("127.0.0.1", str(silent_port), "--timeout", "0.5") as client:
        client.send(b"anyone there?\n")
        client.proc.wait(30)  # stdin still open
        code, _, err = client.finish()
    assert code == 1
    _assert_no_reply_line(err, silent_port, "0.5s")


def test_pipe_timeout_counts_only_the_servers_silence(serve_process: ServeProcess) -> None:
    """--timeout counts the server's silence only: a pause in the input is not one."""
    server = serve_process()
    with piped_client("127.0.0.1", str(server.port), "--timeout", "200ms") as client:
        assert client.echo(b"one\n") == b"one\n"
        # Quiet on both sides for five timeouts, nothing owed: the client waits for input.
        # (Nothing signals that something did not happen; this wait is the test.)
        with contextlib.suppress(subprocess.TimeoutExpired):
            client.proc.wait(1.0)
        assert client.proc.poll() is None, client.stderr.read()
        assert client.finish(b"two\n") == (0, b"two\n", b"")


def test_pipe_reset_by_the_server_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with piped_client("127.0.0.1", str(port)) as client:
            listener.settimeout(30)
            conn, _ = listener.accept()
            client.send(b"hello\n")
            conn.settimeout(30)
            assert conn.recv(100) == b"hello\n"
            # Linger 0: close() sends a reset instead of a FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            code, _, err = client.finish()
    assert code == 1
    assert err.decode().splitlines() == [
        f"aecho: error: connection to 127.0.0.1:{port} broke: Connection reset by peer"
    ]


def test_closed_stdout_ends_quietly_like_cat(serve_process: ServeProcess, tmp_path: Path) -> None:
    """``aecho client ... | head -1``: killed by SIGPIPE as cat would be, nothing printed."""
    server = serve_process()
    src = tmp_path / "lines.txt"
    src.write_bytes(b"a line of text\n" * 1_000_000)  # far more than a pipe holds
    with (
        src.open("rb") as stdin,
        piped_client("127.0.0.1", str(server.port), stdin=stdin) as client,
    ):
        assert client.stdout.readline() == b"a line of text\n"
        client.stdout.close()  # what head does once it has its line
        err = client.stderr.read()
        code = client.proc.wait(30)
    assert err == b""
    assert code == -signal.SIGPIPE


def test_unwritable_stdout_is_one_line(serve_process: ServeProcess) -> None:
    server = serve_process()
    with open("/dev/full", "wb") as full:
        out = subprocess.run(
            aecho("client", "127.0.0.1", str(server.port)),
            input=b"x\n",
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert out.returncode == 1
    assert out.stderr.decode().splitlines() == [
        "aecho: error: cannot write the replies to stdout: No space left on device"
    ]


def test_ctrl_c_in_pipe_mode_exits_130_quietly(serve_process: ServeProcess) -> None:
    server = serve_process()
    with piped_client("127.0.0.1", str(server.port)) as client:
        assert client.echo(b"ping\n") == b"ping\n"
        client.proc.send_signal(signal.SIGINT)
        code, _, err = client.finish()
    assert (code, err) == (130, b"")


def test_interactive_mode_prompts_echoes_and_quits(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    with terminal(tmp_path, "127.0.0.1", str(serve_process().port)) as term:
        os.write(term.fd, b"hello, terminal\n")
        screen = term.read_until(b"client > ")
        # The terminal echoes the typed line once; the server's echo is printed once more.
        assert screen.count(b"hello, terminal") == 2, screen
        os.write(term.fd, b"quit\n")
        assert term.finish() == 0


def test_interactive_ctrl_d_ends_cleanly(serve_process: ServeProcess, tmp_path: Path) -> None:
    with terminal(tmp_path, "127.0.0.1", str(serve_process().port)) as term:
        os.write(term.fd, b"\x04")  # Ctrl-D at an empty prompt
        assert term.finish() == 0


def test_interactive_reports_a_closed_connection_at_once(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    """The server's idle timeout cuts the connection while a line is half typed: the client
    says so without waiting for Enter, and leaves the terminal as it found it."""
    server = serve_process("--idle-timeout", "500ms")
    with terminal(tmp_path, "127.0.0.1", str(server.port)) as term:
        os.write(term.fd, b"half a li")
        screen = term.read_until(b"server closed the connection", timeout=20)
        assert f"server closed the connection (127.0.0.1:{server.port})".encode() in screen
        assert term.finish() == 1
        assert term.line_mode()


def test_interactive_reply_timeout(silent_port: int, tmp_path: Path) -> None:
    with terminal(tmp_path, "127.0.0.1", str(silent_port), "--timeout", "500ms") as term:
        os.write(term.fd, b"hello?\n")
        screen = term.read_until(b"waits forever)", timeout=20)
        assert f"no reply from 127.0.0.1:{silent_port} within 0.5s".encode() in screen
        assert term.finish() == 1


def test_interactive_history_persists_from_run_to_run(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    port = str(serve_process().port)
    with terminal(tmp_path, "127.0.0.1", port) as term:
        os.write(term.fd, b"remember me\n")
        term.read_until(b"client > ")
        os.write(term.fd, b"\x04")
        assert term.finish() == 0
    history = tmp_path / "aecho" / "client_history"
    assert "remember me" in history.read_text().splitlines()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert stat.S_IMODE(history.parent.stat().st_mode) == 0o700

    with terminal(tmp_path, "127.0.0.1", port) as term:
        os.write(term.fd, b"\x10\n")  # Ctrl-P: the previous line, from the last run
        screen = term.read_until(b"client > ")
        assert screen.count(b"remember me") == 2, screen  # recalled, then echoed
        os.write(term.fd, b"quit\n")
        assert term.finish() == 0
    assert history.read_text().splitlines()[-2:] == ["remember me", "quit"]


def test_two_interactive_clients_at_once_keep_both_histories(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    port = str(serve_process().port)
    with (
        terminal(tmp_path, "127.0.0.1", port) as first,
        terminal(tmp_path, "127.0.0.1", port) as second,
    ):
        for term, line in ((first, b"from the first\n"), (second, b"from the second\n")):
            os.write(term.fd, line)
            term.read_until(b"client > ")
        for term in (second, first):
            os.write(term.fd, b"\x04")
            assert term.finish() == 0
    lines = (tmp_path / "aecho" / "client_history").read_text().splitlines()
    assert sorted(lines) == ["from the first", "from the second"]


def test_end_of_input_taken_with_the_last_chunk_still_half_closes() -> None:
    """stdin's last chunk and its end both wait in the queue when the loop looks, their
    wake-ups already read: the half-close follows the chunk out, though nothing else wakes
    the loop for it (it waited for the server, which waited for the end of input)."""

    source = _Stdin(io.BytesIO(b"anyone there?\n"))
    source.start()
    deadline = time.monotonic() + 10
    while source._chunks.qsize() < 2 and time.monotonic() < deadline:  # chunk, then None
        time.sleep(0.01)
    assert source._chunks.qsize() == 2
    source.wake.recv(4096)  # both wake-ups read at once, as by a loop woken by the first
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def echo_until_eof() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                got = b""
                while chunk := conn.recv(100):  # until the half-close
                    got += chunk
                conn.sendall(got)

        server = threading.Thread(target=echo_until_eof)
        server.start()
        sock = socket.create_connection(("127.0.0.1", port))
        out = io.BytesIO()
        config = ClientConfig(port=port, timeout=5.0)
        try:
            _Pipe(config, sock, Plain(sock), source, out).run()  # before: no reply in 5 s
        finally:
            sock.close()
            source.close()
            server.join(10)
    assert out.getvalue() == b"anyone there?\n"
