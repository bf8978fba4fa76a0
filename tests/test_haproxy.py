"""Two aecho backends behind a real HAProxy (deploy/haproxy.cfg): PROXY v2, leastconn, failover."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
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


def _server_states(stats_socket: str) -> dict[str, str]:
    """Backend server name -> UP/DOWN/..., from HAProxy's runtime API."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(stats_socket)
        s.sendall(b"show stat\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    states = {}
    for line in out.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "aecho" and fields[1] not in ("BACKEND", "FRONTEND"):
            states[fields[1]] = fields[17]
    return states


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="aecho-hap-"))  # short: holds a Unix socket
    yield d
    shutil.rmtree(d, ignore_errors=True)


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


def _seen_ports(backend: ServerProcess) -> set[int]:
    return {int(m.group(1)) for m in PROXIED.finditer(backend.output)}


def test_behind_haproxy(serve_process: Callable[..., ServerProcess], workdir: Path) -> None:
    haproxy = _haproxy()
    args = ("--proxy-protocol", "v2", "--log-level", "debug")
    backends = [serve_process(*args), serve_process(*args)]
    front = _free_port()
    stats_socket = str(workdir / "stats.sock")
    cfg = DEPLOY_CFG.read_text()
    cfg = cfg.replace("global\n", f"global\n    stats socket {stats_socket} level admin\n", 1)
    cfg = re.sub(r"bind \S+", f"bind 127.0.0.1:{front}", cfg)
    cfg = re.sub(r"inter \S+ fall \S+ rise \S+", "inter 100ms fall 2 rise 1", cfg)
    cfg = re.sub(r"\n    server .*", "", cfg)
    for n, b in enumerate(backends, 1):
        cfg += f"    server aecho{n} 127.0.0.1:{b.port}\n"
    (workdir / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen(
        [haproxy, "-db", "-f", str(workdir / "haproxy.cfg")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(lambda: os.path.exists(stats_socket), 30), "haproxy did not start"
        assert wait_until(
            lambda: _server_states(stats_socket) == {"aecho1": "UP", "aecho2": "UP"}, 30
        ), _server_states(stats_socket)

        ports = asyncio.run(_drive(front, 200))
        assert len(ports) == 200
        # Each backend logged the real client (our own source port), not HAProxy's.
        assert wait_until(lambda: ports <= _seen_ports(backends[0]) | _seen_ports(backends[1]), 30)
        served = [len(ports & _seen_ports(b)) for b in backends]
        assert all(served), served
        assert sum(served) == 200

        # Take one backend away: once the health check marks it down, traffic goes on.
        assert backends[0].stop() == 0
        assert wait_until(lambda: _server_states(stats_socket).get("aecho1") == "DOWN", 30)
        before = _seen_ports(backends[1])
        more = asyncio.run(_drive(front, 100))
        assert wait_until(lambda: more <= _seen_ports(backends[1]) - before, 30)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)
    # Health checks (PROXY v2 LOCAL) were accepted, never refused as bad headers.
    assert "closing" not in backends[1].output, backends[1].output[-2000:]
