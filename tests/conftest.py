"""Shared test fixtures: both event loops, and real servers on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from hypothesis import settings

from aecho.config import ServerConfig
from aecho.process.pidfile import parse_pid, pid_alive
from aecho.process.systemd import Notification, NotifyReceiver
from aecho.server.server import Server

# CI machines are shared and slow at times: no per-example deadline there, and the
# failing example printed so it can be replayed.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs once on the stdlib loop and once on uvloop."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@contextlib.asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[Server]:
    """An in-process server on 127.0.0.1, port 0, in the test's own loop."""
    config = replace(ServerConfig(port=0), **overrides).validate()
    server = Server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


async def closed_without_reply(
    port: int, data: bytes = b"?", host: str = "127.0.0.1", timeout: float = 10.0
) -> bool:
    """Send ``data``; True when the server closes (or resets) the connection without a reply."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class ServerProcess:
    """``aecho serve`` in a subprocess, ready once it sent READY=1 to a private NOTIFY_SOCKET.

    The READY notification names the bound addresses, so ``--port 0`` needs no log parsing.
    A test that passes its own ``NOTIFY_SOCKET`` in ``env`` waits for readiness itself.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        cmd = [sys.executable, "-m", "aecho", "serve", *args]
        own_notify = "NOTIFY_SOCKET" not in (env or {})
        self.notify = NotifyReceiver() if own_notify else None
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(self.notify.env if self.notify else {}), **(env or {})},
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.host = ""
        self.port = 0
        self.ready: Notification | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if self.notify is None:
            return
        self.ready = self.notify.wait_ready(ready_timeout, lambda: self.proc.poll() is not None)
        if self.ready is None:
            self.kill()
            raise RuntimeError(f"server did not become ready: {self.output}")
        for addr in self.ready.addresses:
            if isinstance(addr, tuple):
                self.host, self.port = addr
                break

    def wait_stopping(self, timeout: float = 10.0) -> bool:
        """Wait for the STOPPING=1 notification: a graceful stop has begun."""
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            note = self.notify.receive(remaining)
            if note is not None and note.stopping:
                return True
        return False

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_pipe()
        return rc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``aecho serve --port 0 ARGS...`` subprocesses; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs: Any) -> ServerProcess:
        proc = ServerProcess(["--port", "0", *args], **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def round_trip(sock: socket.socket, payload: bytes, lines: int | None = None) -> bytes:
    """Send ``payload``; read until as many bytes (or ``lines`` lines) came back, or EOF."""
    sock.sendall(payload)
    got = b""
    while (got.count(b"\n") < lines) if lines is not None else (len(got) < len(payload)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def read_line(sock: socket.socket) -> bytes:
    """Read up to and including the next newline (less, if the peer closes first); reads
    of 100 bytes at most, so what follows the line stays in the socket."""
    got = b""
    while not got.endswith(b"\n"):
        data = sock.recv(100)
        if not data:
            break
        got += data
    return got


def echo_once(
    port: int, payload: bytes = b"hello\x00\xff\n", host: str = "127.0.0.1", timeout: float = 30.0
) -> bytes:
    """Connect, send ``payload``, return what came back (as many bytes, or until EOF)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return round_trip(sock, payload)


def run_aecho(
    *args: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """``python -m aecho ARGS`` to completion: its exit status, stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "aecho", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        pass_fds=pass_fds,
        timeout=timeout,
    )


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the positions ``cuts`` (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def until(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` on the loop (an in-process server runs there too), bounded in
    time; for a condition no event announces."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- aecho bench: the command, and echo servers that misbehave on purpose -------------------------


def bench_cli(*args: str) -> tuple[int, str, str]:
    """``aecho bench ARGS...`` in this process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from aecho.cli import app

    out = CliRunner().invoke(app, ["bench", *args])
    return out.exit_code, out.stdout, out.stderr


def run_bench(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``aecho bench ARGS...`` in a subprocess (at most 120 s)."""
    return subprocess.run(
        [sys.executable, "-m", "aecho", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@contextlib.contextmanager
def threaded_server(factory: Callable[[], asyncio.Protocol], ssl_ctx: Any = None) -> Iterator[int]:
    """A server of ``factory`` protocols on 127.0.0.1, port 0, on a loop of its own in a
    thread (so a test's bench can block its own thread); yields the port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ssl_ctx)
        box["port"] = server.sockets[0].getsockname()[1]
        box["stop"] = stop = asyncio.Event()
        ready.set()
        await stop.wait()
        server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield int(box["port"])
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(10)
        loop.close()


class Echo(asyncio.Protocol):
    """A plain echo."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class SilentOnFirst(Echo):
    """Echoes on every connection but the first one accepted, which never gets a reply."""

    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        SilentOnFirst.accepted += 1
        self.silent = SilentOnFirst.accepted == 1

    def data_received(self, data: bytes) -> None:
        if not self.silent:
            self.transport.write(data)


class Silent(Echo):
    """Accepts and reads, and never answers."""

    def data_received(self, data: bytes) -> None:
        pass


# -- processes, as /proc sees them ------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        top = frontier.pop()
        kids = [child for child, parent in parents.items() if parent == top]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> bytes:
    """What ps shows for ``pid`` (NULs as spaces); b"" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").strip()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nothing listens on right now (for options that cannot take 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Terminal:
    """``aecho client ARGS`` with a pseudo-terminal as its stdin, stdout and stderr.

    ``state_home`` is its XDG_STATE_HOME, so its history stays out of the real home.
    """

    def __init__(self, state_home: Path, *args: str) -> None:
        self.fd, child_end = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aecho", "client", *args],
            stdin=child_end,
            stdout=child_end,
            stderr=child_end,
            env={**os.environ, "XDG_STATE_HOME": str(state_home)},
            start_new_session=True,
        )
        os.close(child_end)

    def read_until(self, token: bytes, timeout: float = 15.0) -> bytes:
        """What the client wrote, up to ``token`` (or all until ``timeout`` or its exit)."""
        buf = b""
        deadline = time.monotonic() + timeout
        while token not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                buf += chunk
        return buf

    def finish(self) -> int:
        self.read_until(b"\x00", timeout=5)  # drain until the child closes the terminal
        return self.proc.wait(10)

    def line_mode(self) -> bool:
        """Is the terminal in its normal line mode (not left raw by readline)?"""
        lflag = termios.tcgetattr(self.fd)[3]
        return bool(lflag & termios.ICANON and lflag & termios.ECHO)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.fd)


@contextlib.contextmanager
def terminal(state_home: Path, *args: str) -> Iterator[Terminal]:
    """A :class:`Terminal` whose client has shown its first prompt; killed at the end."""
    term = Terminal(state_home, *args)
    try:
        assert b"client > " in term.read_until(b"client > ")
        yield term
    finally:
        term.close()


# -- peers that send and never read ------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class FloodResult:
    """What :func:`flood` saw: the server's RSS growth and the probe's latencies."""

    sent: int = 0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    probe_ms: list[float] = field(default_factory=list)
    probe_failures: int = 0

    @property
    def growth_mib(self) -> float:
        return (self.rss_peak_kib - self.rss_before_kib) / 1024

    @property
    def probe_p99_ms(self) -> float:
        if not self.probe_ms:
            return float("inf")
        ordered = sorted(self.probe_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# The flooders run in a process of their own, so their sending loop cannot take the
# interpreter lock from the probe whose latency is measured.
_FLOODER = """
import select, socket, sys, time
port, peers, seconds, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
chunk = open(path, "rb").read()
socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(peers)]
for s in socks:
    s.setblocking(False)
print("connected", flush=True)
sent = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    _, writable, _ = select.select([], socks, [], 0.05)
    for s in writable:
        try:
            sent += s.send(chunk)
        except BlockingIOError:
            pass
print(sent, flush=True)
"""


def flood(
    pid: int,
    port: int,
    chunk: bytes,
    probe: bytes,
    reply: bytes,
    seconds: float,
    peers: int = 10,
    probe_every: float = 0.02,
) -> FloodResult:
    """``peers`` connections send ``chunk`` as fast as they can for ``seconds`` and never
    read, while a probe connection sends ``probe`` every ``probe_every`` s and waits for
    ``reply``.  Server RSS is sampled throughout; its peak is what counts.
    """
    result = FloodResult(rss_before_kib=rss_kib(pid), rss_peak_kib=rss_kib(pid))
    stop = threading.Event()

    def probing() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for _ in range(int(seconds / probe_every) + 1):
                if stop.wait(probe_every):
                    return
                started = time.monotonic()
                try:
                    sock.sendall(probe)
                    got = b""
                    while len(got) < len(reply):
                        data = sock.recv(65536)
                        if not data:
                            raise ConnectionError("closed")
                        got += data
                except OSError:
                    result.probe_failures += 1
                    return
                if got != reply:
                    result.probe_failures += 1
                result.probe_ms.append((time.monotonic() - started) * 1000)

    with tempfile.NamedTemporaryFile() as payload:
        payload.write(chunk)
        payload.flush()
        flooder = subprocess.Popen(
            [sys.executable, "-c", _FLOODER, str(port), str(peers), str(seconds), payload.name],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flooder.stdout is not None
        try:
            assert flooder.stdout.readline().strip() == "connected"
            prober = threading.Thread(target=probing, daemon=True)
            prober.start()
            deadline = time.monotonic() + seconds + 30
            while flooder.poll() is None and time.monotonic() < deadline:
                result.rss_peak_kib = max(result.rss_peak_kib, rss_kib(pid))
                time.sleep(0.05)
            result.rss_peak_kib = max(result.rss_peak_kib, rss_kib(pid))
            result.sent = int(flooder.stdout.readline() or 0)
        finally:
            stop.set()
            flooder.kill()
            flooder.wait(10)
            flooder.stdout.close()
    prober.join(10)
    return result


# -- daemons ---------------------------------------------------------------------------------

SERVING = re.compile(r"^aecho serving on 127\.0\.0\.1:(\d+) \(pid (\d+), pidfile (\S+)\)$")


@dataclass
class Daemon:
    pid: int
    port: int
    pidfile: Path


class Daemons:
    """Starts daemons and remembers every pid (and pidfile) to kill at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pids: set[int] = set()
        self.pidfiles: set[Path] = set()

    def start(
        self, *args: str, pidfile: Path | None = None, env: dict[str, str] | None = None
    ) -> Daemon:
        pidfile = pidfile or self.tmp_path / "aecho.pid"
        self.pidfiles.add(pidfile)
        result = run_aecho(
            "serve", "--daemon", "--port", "0", "--pidfile", str(pidfile), *args, env=env
        )
        m = SERVING.match(result.stdout.strip())
        if m:
            self.pids.add(int(m.group(2)))
        assert result.returncode == 0, result.stderr
        assert m, result.stdout
        return Daemon(pid=int(m.group(2)), port=int(m.group(1)), pidfile=pidfile)

    def track(self, pid: int) -> None:
        self.pids.add(pid)

    def cleanup(self) -> None:
        for path in self.pidfiles:
            with contextlib.suppress(OSError):
                pid = parse_pid(path.read_text())
                if pid is not None and pid != os.getpid():
                    self.pids.add(pid)
        for pid in self.pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    paths = {"cert": d / "cert.pem", "key": d / "key.pem", "ca": d / "ca.pem"}
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(paths["cert"], append=True)
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    return {k: str(v) for k, v in paths.items()}
