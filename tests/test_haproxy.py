"""aecho backends behind a real HAProxy (deploy/haproxy.cfg): PROXY v2, leastconn, failover."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, wait_until

DEPLOY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
PROXIED = re.compile(r"proxied connection from 127\.0\.0\.1:(\d+) via")


def _haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("haproxy is not installed; .ci/run installs it (apt-get install haproxy)")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Front:
    """A running HAProxy: the port clients connect to and its runtime API socket."""

    port: int
    api: str

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.api)
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """Backend server name -> its ``show stat`` fields by name (status, scur, wredis...)."""
        header, *rows = self.command("show stat").splitlines()
        names = header.lstrip("# ").split(",")
        servers = {}
        for row in rows:
            fields = dict(zip(names, row.split(","), strict=False))
            if fields.get("pxname") == "aecho" and fields["svname"] not in ("BACKEND", "FRONTEND"):
                servers[fields["svname"]] = fields
        return servers

    def states(self) -> dict[str, str]:
        return {name: fields["status"] for name, fields in self.stats().items()}


@pytest.fixture
def haproxy_front(
    serve_process: Callable[..., ServerProcess],
) -> Iterator[Callable[..., Front]]:
    """Start HAProxy with deploy/haproxy.cfg in front of the given backends (aecho1, aecho2...).

    Only what a test cannot wait for changes: the addresses, checks every 100 ms and how many
    failed ones mark a backend down (``fall``).
    """
    haproxy = _haproxy()
    workdir = Path(tempfile.mkdtemp(prefix="aecho-hap-"))  # short: holds a Unix socket
    procs: list[subprocess.Popen[bytes]] = []

    def start(backends: list[ServerProcess], fall: int = 2) -> Front:
        front = Front(_free_port(), str(workdir / "api.sock"))
        cfg = DEPLOY_CFG.read_text()
        cfg = cfg.replace("global\n", f"global\n    stats socket {front.api} level admin\n", 1)
        cfg = re.sub(r"bind \S+", f"bind 127.0.0.1:{front.port}", cfg)
        cfg = re.sub(r"inter \S+ fall \S+ rise \S+", f"inter 100ms fall {fall} rise 1", cfg)
        cfg = re.sub(r"\n    server .*", "", cfg)
        for n, b in enumerate(backends, 1):
            cfg += f"    server aecho{n} 127.0.0.1:{b.port}\n"
        (workdir / "haproxy.cfg").write_text(cfg)
        procs.append(
            subprocess.Popen(
                [haproxy, "-db", "-f", str(workdir / "haproxy.cfg")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        assert wait_until(lambda: os.path.exists(front.api), 30), "haproxy did not start"
        all_up = {f"aecho{n}": "UP" for n in range(1, len(backends) + 1)}
        assert wait_until(lambda: front.states() == all_up, 30), front.states()
        return front

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    shutil.rmtree(workdir, ignore_errors=True)


def test_deploy_config_is_valid() -> None:
    res = subprocess.run(
        [_haproxy(), "-c", "-f", str(DEPLOY_CFG)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


async def _one(port: int, i: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        local_port = int(writer.get_extra_info("sockname")[1])
        payload = f"client {i} ".encode() + os.urandom(i * 37 % 4000) + b"\x00\n"
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 60) == payload
        return local_port
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _drive(port: int, count: int) -> set[int]:
    return set(await asyncio.gather(*(_one(port, i) for i in range(count))))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _seen_ports(backend: ServerProcess) -> set[int]:
    return {int(m.group(1)) for m in PROXIED.finditer(backend.output)}


BACKEND_ARGS = ("--proxy-protocol", "v2", "--log-level", "debug")


def test_behind_haproxy(
    serve_process: Callable[..., ServerProcess],
    haproxy_front: Callable[..., Front],
) -> None:
    backends = [serve_process(*BACKEND_ARGS), serve_process(*BACKEND_ARGS)]
    front = haproxy_front(backends)
    ports = asyncio.run(_drive(front.port, 200))
    assert len(ports) == 200
    # Each backend logged the real client (our own source port), not HAProxy's.
    assert wait_until(lambda: ports <= _seen_ports(backends[0]) | _seen_ports(backends[1]), 30)
    served = [len(ports & _seen_ports(b)) for b in backends]
    assert all(served), served
    assert sum(served) == 200
    # Health checks (PROXY v2 LOCAL) were accepted, never refused as bad headers.
    for b in backends:
        assert "closing" not in b.output, b.output[-2000:]


class Prober:
    """Threads that each open a new connection through HAProxy, echo a line and close, again
    and again, until :meth:`stop` or ``limit`` attempts in all.

    Every attempt is kept as (start time, error or None).
    """

    def __init__(self, port: int, threads: int = 4, limit: int = 20_000) -> None:
        self.port = port
        self.limit = limit
        self.results: list[tuple[float, str | None]] = []
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _probe(self, n: int) -> str | None:
        payload = f"probe {n}\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(payload)
                reply = b""
                while len(reply) < len(payload) and (chunk := s.recv(4096)):
                    reply += chunk
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if reply == payload else f"reply {reply!r} to {payload!r}"

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.results) < self.limit:
            started = time.monotonic()
            self.results.append((started, self._probe(next(self._numbers))))

    def started_after(self, t: float) -> int:
        return sum(1 for started, _ in self.results if started >= t)

    def stop(self) -> list[tuple[float, str | None]]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.results

    @staticmethod
    def failures(results: list[tuple[float, str | None]], t0: float) -> list[tuple[float, str]]:
        """The failed attempts, as (start time relative to t0, error)."""
        return [(round(t - t0, 3), err) for t, err in results if err is not None]


def test_new_connections_survive_a_backend_stop(
    serve_process: Callable[..., ServerProcess],
    haproxy_front: Callable[..., Front],
) -> None:
    """Between a backend's stop and its health check marking it down, leastconn still picks it:
    every such connection must be redispatched to the other backend, none may fail."""
    backends = [serve_process(*BACKEND_ARGS), serve_process(*BACKEND_ARGS)]
    front = haproxy_front(backends, fall=3)  # marked down 200-300 ms after it stops
    prober = Prober(front.port)
    try:
        assert wait_until(lambda: prober.started_after(0) >= 50, 30)
        # New connections flow throughout: a stopping aecho serves what waits in its
        # accept queue instead of resetting it, and HAProxy redispatches the connections
        # it then refuses.
        stopped_at = time.monotonic()
        backends[0].signal(signal.SIGTERM)
        assert wait_until(lambda: _refused(backends[0].port), 10, 0.002)
        assert wait_until(lambda: front.states().get("aecho1") == "DOWN", 30)
        down_at = time.monotonic()
        assert wait_until(lambda: prober.started_after(down_at) >= 50, 30)
    finally:
        results = prober.stop()
    assert backends[0].proc.wait(30) == 0  # SIGTERM was sent: a second one would force
    failed = Prober.failures(results, stopped_at)
    assert not failed, f"{len(failed)} of {len(results)} new connections failed: {failed[:5]}"
    # The window was really probed: HAProxy sent connections to the stopped backend and
    # redispatched them.  Without this, a test that never hit the window would pass.
    stats = front.stats()["aecho1"]
    in_window = sum(1 for t, _ in results if stopped_at <= t < down_at)
    assert int(stats["wredis"]) > 0, (in_window, stats)


def test_rolling_restart_without_a_failed_connection(
    serve_process: Callable[..., ServerProcess],
    haproxy_front: Callable[..., Front],
) -> None:
    """The rolling restart README.md describes: drain a backend, stop it once it has
    no connections left, start it again, set it ready.  New connections arrive the whole
    time; none fails, and the restarted backend takes its share again."""
    backends = [serve_process(*BACKEND_ARGS), serve_process(*BACKEND_ARGS)]
    port = backends[0].port
    front = haproxy_front(backends)
    prober = Prober(front.port)
    try:
        assert wait_until(lambda: prober.started_after(0) >= 50, 30)
        started_at = time.monotonic()
        assert front.command("set server aecho/aecho1 state drain").strip() == ""
        assert wait_until(lambda: front.stats()["aecho1"]["scur"] == "0", 30)
        assert backends[0].stop() == 0
        assert wait_until(lambda: front.states().get("aecho1") == "DOWN", 30)
        restarted = serve_process(*BACKEND_ARGS, "--port", str(port))  # the last --port wins
        # Still drained: checks pass but it takes no new connection until it is set ready.
        assert wait_until(lambda: front.states().get("aecho1") == "DRAIN", 30)
        assert front.command("set server aecho/aecho1 state ready").strip() == ""
        assert wait_until(lambda: front.states().get("aecho1") == "UP", 30)
        ready_at = time.monotonic()
        assert wait_until(lambda: prober.started_after(ready_at) >= 100, 30)
    finally:
        results = prober.stop()
    failed = Prober.failures(results, started_at)
    assert not failed, f"{len(failed)} of {len(results)} new connections failed: {failed[:5]}"
    assert _seen_ports(restarted), "the restarted backend took no connection"
