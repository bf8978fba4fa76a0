"""aecho bench against real servers: verification, pacing, merging, reporting, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aecho.bench import runner
from aecho.bench.connection import ERROR_KINDS, reply_function
from aecho.bench.histogram import Histogram
from aecho.bench.results import Result
from aecho.cli import app
from aecho.config import BenchConfig, ConfigError, Framing
from tests.conftest import ServerProcess, running_server

JSON_KEYS = {"connections", "duration_s", "messages", "msgs_per_s", "mib_per_s", "errors"}
JSON_KEYS |= {"mismatches", "latency_us"}
LATENCY_KEYS = {"p50", "p90", "p99", "p999", "max"}


def cfg_for(port: int, **kw: Any) -> BenchConfig:
    base = BenchConfig(host="127.0.0.1", port=port, connections=4, duration=None, messages=200)
    return replace(base, **kw).validate()


def assert_clean(result: Result) -> None:
    assert result.errors == dict.fromkeys(ERROR_KINDS, 0), result.first_errors


def bench_cli(*args: str) -> tuple[int, str, str]:
    out = CliRunner().invoke(app, ["bench", *args])
    return out.exit_code, out.stdout, out.stderr


# -- misbehaving echo servers, each on a loop of its own in a thread -------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Corrupting(Echo):
    """Echoes, but flips one byte once the whole server has echoed 2,000 bytes."""

    echoed = 0
    done = False

    def data_received(self, data: bytes) -> None:
        cls = Corrupting
        cls.echoed += len(data)
        if cls.echoed > 2000 and not cls.done:
            cls.done = True
            data = bytes([data[0] ^ 0x01]) + data[1:]
        self.transport.write(data)


class Stalling(Echo):
    """Echoes, but blocks its whole loop for 200 ms once, 0.5 s after the first byte."""

    first: float | None = None
    stalled = False

    def data_received(self, data: bytes) -> None:
        cls = Stalling
        now = time.monotonic()
        if cls.first is None:
            cls.first = now
        elif not cls.stalled and now - cls.first > 0.5:
            cls.stalled = True
            time.sleep(0.2)  # the stall under test: nothing on this loop runs meanwhile
        self.transport.write(data)


@contextlib.contextmanager
def threaded_server(
    factory: Callable[[], asyncio.Protocol], ssl_ctx: ssl.SSLContext | None = None
) -> Iterator[int]:
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


# -- counting and verification (in the test's loop: asyncio and uvloop) ----------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("pipeline", [1, 4])
async def test_counts_add_up(pipeline: int) -> None:
    async with running_server() as server:
        cfg = cfg_for(server.port, connections=8, messages=None, duration=0.5, size=100)
        result = await runner.measure(replace(cfg, pipeline=pipeline))
    assert_clean(result)
    assert result.messages > 100
    assert result.hist.total == result.messages
    assert sum(w.sent for w in result.workers) == result.messages  # every message verified
    assert result.bytes == result.messages * 100
    assert result.connected == 8


@pytest.mark.asyncio
async def test_timeline_adds_up_to_the_messages() -> None:
    async with running_server() as server:
        timed = cfg_for(server.port, connections=8, messages=None, duration=0.5, warmup=0.2)
        by_duration = await runner.measure(timed)
        by_count = await runner.measure(cfg_for(server.port, connections=8, messages=3000))
    for result in (by_duration, by_count):
        assert_clean(result)
        assert sum(result.timeline) == result.messages > 0
    assert len(by_duration.timeline) == 5  # one slot per 100 ms measured


@pytest.mark.asyncio
async def test_n_stops_at_exactly_n() -> None:
    async with running_server() as server:
        result = await runner.measure(
            cfg_for(server.port, connections=7, messages=1001, pipeline=3)
        )
    assert_clean(result)
    assert result.messages == 1001
    assert result.workers[0].sent == 1001


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 5, 23, 4000, 70_000])
async def test_sizes_small_and_large(size: int) -> None:
    async with running_server() as server:
        result = await runner.measure(cfg_for(server.port, messages=40, size=size, pipeline=2))
    assert_clean(result)
    assert result.messages == 40
    assert result.bytes == 40 * size


@pytest.mark.asyncio
async def test_line_framing_with_a_handler_is_verified() -> None:
    async with running_server(framing=Framing.line, handler="upper") as server:
        cfg = cfg_for(server.port, framing=Framing.line, handler="upper", size=50)
        result = await runner.measure(cfg)
    assert_clean(result)
    assert result.messages == 200


@pytest.mark.asyncio
async def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    async with running_server(unix=path):
        cfg = BenchConfig(unix=path, connections=3, duration=None, messages=300).validate()
        result = await runner.measure(cfg)
    assert_clean(result)
    assert result.messages == 300


@pytest.mark.asyncio
async def test_corrupted_echo_is_a_mismatch() -> None:
    Corrupting.echoed, Corrupting.done = 0, False
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Corrupting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await runner.measure(cfg_for(port, messages=500, size=64))
    finally:
        server.close()
    assert result.errors["mismatch"] == 1
    assert result.messages < 500


@pytest.mark.asyncio
async def test_warmup_is_left_out_and_connect_rate_paces() -> None:
    async with running_server() as server:
        cfg = cfg_for(server.port, connections=8, messages=None, duration=0.4, warmup=0.3)
        t0 = time.monotonic()
        result = await runner.measure(replace(cfg, connect_rate=40.0))
        elapsed = time.monotonic() - t0
    assert_clean(result)
    assert result.connected == 8
    assert elapsed >= 7 / 40 + 0.3 + 0.4 - 0.02  # 8 connects 25 ms apart, warm-up, measuring
    assert 0.4 <= result.duration_s < 0.4 + 5  # the warm-up is not part of the duration
    assert result.hist.total == result.messages > 0
    assert len(result.timeline) <= 6


def test_unverifiable_handler_is_refused() -> None:
    with pytest.raises(ConfigError, match="framing line"):
        reply_function(BenchConfig(handler="sha256"))


# -- the command line ------------------------------------------------------------------------------


def test_cli_corrupting_server_exits_1() -> None:
    Corrupting.echoed, Corrupting.done = 0, False
    with threaded_server(Corrupting) as port:
        code, out, err = bench_cli("127.0.0.1", str(port), "-n", "500", "-c", "4", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["mismatches"] == 1
    assert "did not match" in err


def test_cli_json_has_the_keys(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    code, out, _ = bench_cli("127.0.0.1", str(server.port), "-d", "0.5", "-c", "5", "--json")
    assert code == 0
    data = json.loads(out)  # the whole of stdout is one JSON object
    assert data.keys() >= JSON_KEYS
    assert data["latency_us"].keys() >= LATENCY_KEYS
    assert data["connections"] == 5
    assert data["errors"] == data["mismatches"] == 0
    assert data["messages"] > 0
    lat = data["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]


def test_cli_table_and_thresholds(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    code, out, err = bench_cli("127.0.0.1", str(server.port), "-n", "300", "-c", "3")
    assert code == 0, err
    assert "msgs/s" in out and "latency p99" in out
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "-n", "300", "-c", "3", "--max-p99", "0.000001"
    )
    assert code == 1
    assert "above --max-p99" in err
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "-n", "300", "-c", "3", "--min-rate", "1e12"
    )
    assert code == 1
    assert "below --min-rate" in err


def test_cli_plot(serve_process: Callable[..., ServerProcess], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    server = serve_process()
    png = tmp_path / "bench.png"
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "-d", "0.5", "-c", "2", "--json", "--plot", str(png)
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_nothing_listening() -> None:
    code, out, err = bench_cli("127.0.0.1", str(free_port()), "-n", "10")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "nothing is listening on 127.0.0.1:" in err


def test_cli_connection_limit(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process("--max-connections", "3")
    code, _, err = bench_cli("127.0.0.1", str(server.port), "-n", "200", "-c", "6", "--json")
    assert code == 1
    assert "connection limit" in err


def test_cli_usage_errors() -> None:
    code, _, err = bench_cli("-d", "1", "-n", "5")
    assert code == 2
    assert "not both" in err
    code, _, err = bench_cli("--handler", "reverse")
    assert code == 2
    assert "--framing line" in err
    code, _, err = bench_cli("--workers", "3", "-c", "2")
    assert code == 2


# -- pacing and latency ----------------------------------------------------------------------------


def test_rate_holds_within_5_percent(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    cfg = cfg_for(server.port, connections=20, messages=None, duration=3.0, rate=2000, size=64)
    result = runner.run(cfg)
    assert_clean(result)
    assert abs(result.messages / 3.0 - 2000) <= 0.05 * 2000, result.messages
    # Open loop: sends follow the schedule, so every whole second carries about the rate.
    per_tick = [sum(result.timeline[i : i + 10]) for i in range(0, 30, 10)]
    assert all(abs(n - 2000) <= 0.1 * 2000 for n in per_tick), per_tick


def test_a_stall_shows_in_p999_with_rate() -> None:
    Stalling.first, Stalling.stalled = None, False
    with threaded_server(Stalling) as port:
        cfg = cfg_for(port, connections=10, messages=None, duration=2.0, rate=1000, size=64)
        result = runner.run(cfg)
    assert Stalling.stalled
    assert_clean(result)
    p999 = result.hist.percentile(99.9)
    assert p999 >= 150_000_000, p999
    # Corrected for coordinated omission: every message due during the stall waited.
    slow = sum(1 for _, v in result.hist.curve() if v >= 100_000_000)
    assert slow > 0
    assert result.hist.percentile(95) >= 50_000_000 or result.hist.percentile(96) >= 50_000_000


def test_workers_merge_histograms_exactly(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    cfg = cfg_for(server.port, connections=4, messages=2001, workers=2, size=64)
    result = runner.run(cfg)
    assert_clean(result)
    assert len(result.workers) == 2
    assert [w.messages for w in result.workers] == [1001, 1000]
    assert result.messages == 2001
    parts = [Histogram.from_dict(w.hist) for w in result.workers]
    assert result.hist == Histogram.merged(parts)
    assert result.hist.total == 2001
    assert result.hist.counts == [a + b for a, b in zip(*(p.counts for p in parts), strict=True)]
    assert result.hist.max == max(p.max for p in parts)


# -- the embedded server and the process ---------------------------------------------------------


def run_bench(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aecho", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def test_embedded_mode_starts_and_stops_its_server() -> None:
    out = run_bench("-n", "500", "-c", "5", "-s", "64", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["messages"] == 500
    pid = data["embedded_server_pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped, not left behind


def test_fd_limit_is_explained() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    out = run_bench("127.0.0.1", "9", "-c", "500", "-n", "10", preexec_fn=low_limit)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "file descriptors" in out.stderr and "ulimit -n" in out.stderr


def test_ctrl_c_stops_early_and_reports(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    args = ["127.0.0.1", str(server.port), "-d", "60", "-c", "4", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aecho", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # readiness: printed once the load starts
        assert "measuring" in line
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    data = json.loads(out)
    assert data["interrupted"] is True
    assert data["duration_s"] < 30
    assert data["errors"] == 0


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    args = ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out", cert]
    subprocess.run(
        [
            "openssl",
            "req",
            *args,
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls(tls_cert: tuple[str, str]) -> None:
    cert, key = tls_cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with threaded_server(Echo, ctx) as port:
        code, out, err = bench_cli(
            "127.0.0.1", str(port), "-n", "300", "-c", "3", "--tls", "--cafile", cert, "--json"
        )
        assert code == 0, err
        assert json.loads(out)["messages"] == 300
        code, out, err = bench_cli("127.0.0.1", str(port), "-n", "30", "--tls", "--insecure")
        assert code == 0, err
        code, out, err = bench_cli("127.0.0.1", str(port), "-n", "30", "-c", "2", "--tls")
        assert code == 1
        assert err.count("\n") == 1
        assert "TLS handshake with 127.0.0.1:" in err


def test_sigterm_still_reports_and_stops_the_embedded_server() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aecho", "bench", "-d", "60", "-c", "4", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "measuring" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = json.loads(out)
    assert data["interrupted"] is True
    with pytest.raises(ProcessLookupError):
        os.kill(data["embedded_server_pid"], 0)


def test_live_progress_on_a_terminal(serve_process: Callable[..., ServerProcess]) -> None:
    """With stderr on a terminal, a live line shows progress and is erased; stdout gets the
    table.  Without one (every other test), stderr gets one plain line instead."""
    import pty

    server = serve_process()
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="30")
    env.pop("NO_COLOR", None)
    argv = [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(server.port)]
    proc = subprocess.Popen(
        [*argv, "-c", "3", "-d", "2"],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, seen
    text = seen.decode(errors="replace")
    assert "msgs/s" in text and "p99" in text and "errors 0" in text
    assert " / 2 s" in text  # elapsed of the total
    assert "\x1b[" in text  # drawn in place with terminal controls, not printed line by line
    assert "measuring with" not in text
    assert b"msgs/s" in out and b"latency p99" in out
    assert b"\x1b[" not in out  # the table on a pipe is plain text
