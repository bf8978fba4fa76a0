"""README promises of ``aecho client`` (history, ``--timeout 0``), of ``aecho bench`` (the busy
threshold, the search's precision, the embedded server's connections) and of the offload
pool's server-wide byte budget."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from aecho.bench import report
from aecho.bench.histogram import Histogram
from aecho.bench.results import Result, Setup
from aecho.bench.search import find_max_rate
from aecho.config import POOL_BUDGET, BenchConfig, ServerConfig
from tests.conftest import ServerProcess, Terminal, run_bench, running_server, terminal

ServeProcess = Callable[..., ServerProcess]
KiB = 1024
MiB = 1024 * KiB


def aecho(*args: str) -> list[str]:
    return [sys.executable, "-m", "aecho", *args]


# -- aecho client: history -------------------------------------------------------------------


class HomeTerminal(Terminal):
    """``aecho client ARGS`` on a pseudo-terminal, with ``home`` as HOME and no
    XDG_STATE_HOME at all."""

    def __init__(self, home: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
        env["HOME"] = str(home)
        self.fd, child_end = pty.openpty()
        self.proc = subprocess.Popen(
            aecho("client", *args),
            stdin=child_end,
            stdout=child_end,
            stderr=child_end,
            env=env,
            start_new_session=True,
        )
        os.close(child_end)


def test_history_keeps_the_last_1000_lines(serve_process: ServeProcess, tmp_path: Path) -> None:
    history = tmp_path / "aecho" / "client_history"
    history.parent.mkdir(mode=0o700)
    seeded = [f"seeded line {i}" for i in range(1005)]
    history.write_text("".join(line + "\n" for line in seeded))
    history.chmod(0o600)

    with terminal(tmp_path, "127.0.0.1", str(serve_process().port)) as term:
        os.write(term.fd, b"the newest line\n")
        assert b"the newest line" in term.read_until(b"client > ")
        os.write(term.fd, b"quit\n")
        assert term.finish() == 0

    kept = history.read_text().splitlines()
    assert len(kept) == 1000
    assert kept == [*seeded, "the newest line", "quit"][-1000:]


def test_history_lives_in_local_state_without_xdg_state_home(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    term = HomeTerminal(tmp_path, "127.0.0.1", str(serve_process().port))
    try:
        assert b"client > " in term.read_until(b"client > ")
        os.write(term.fd, b"kept at home\n")
        term.read_until(b"client > ")
        os.write(term.fd, b"quit\n")
        assert term.finish() == 0
    finally:
        term.close()
    history = tmp_path / ".local" / "state" / "aecho" / "client_history"
    assert history.read_text().splitlines() == ["kept at home", "quit"]
    assert stat.S_IMODE(history.stat().st_mode) == 0o600  # readable by you alone


# -- aecho client: --timeout 0 waits forever ---------------------------------------------------


@contextlib.contextmanager
def holding_listener() -> Iterator[socket.socket]:
    """A listener on 127.0.0.1, port 0, whose connections the test accepts and holds."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        yield listener


def _still_running(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Nothing signals that something did not happen: this bounded wait is the check."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(seconds)
    return proc.poll() is None


@pytest.mark.parametrize("input_ended", [False, True], ids=["input-open", "input-ended"])
def test_pipe_timeout_0_waits_forever(input_ended: bool) -> None:
    with holding_listener() as listener:
        port = listener.getsockname()[1]
        with subprocess.Popen(
            aecho("client", "127.0.0.1", str(port), "--timeout", "0"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            assert proc.stdin is not None
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(30)
                    proc.stdin.write(b"anyone there?\n")
                    proc.stdin.flush()
                    if input_ended:
                        proc.stdin.close()
                    got = b""
                    while len(got) < 14:
                        chunk = conn.recv(100)
                        assert chunk, got
                        got += chunk
                    assert got == b"anyone there?\n"
                    if input_ended:
                        assert conn.recv(100) == b""  # the half-close: the reply is owed
                    # A reply is owed, and the server stays silent well past a second.
                    assert _still_running(proc, 2.0), proc.stderr.read() if proc.stderr else b""
                # The server closes without a word (input still open, or ended).
                proc.wait(30)
                assert proc.stdout is not None and proc.stderr is not None
                out, err = proc.stdout.read(), proc.stderr.read()
            finally:
                proc.kill()
    if input_ended:  # sent everything back (nothing) and closed: done
        assert (proc.returncode, out, err) == (0, b"", b"")
    else:  # closed before the end of input: one line, exit 1
        assert proc.returncode == 1
        assert err.decode().splitlines() == [
            f"aecho: error: server closed the connection before the end of input (127.0.0.1:{port})"
        ]


def test_interactive_timeout_0_waits_forever(tmp_path: Path) -> None:
    with holding_listener() as listener:
        port = listener.getsockname()[1]
        term = Terminal(tmp_path, "127.0.0.1", str(port), "--timeout", "0")
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                assert b"client > " in term.read_until(b"client > ")
                os.write(term.fd, b"hello?\n")
                assert conn.recv(100) == b"hello?\n"
                screen = term.read_until(b"aecho: error", timeout=2.0)
                assert b"aecho: error" not in screen, screen
                assert term.proc.poll() is None
            # The server closes while the client waits for its reply.
            screen = term.read_until(b"server closed the connection", timeout=20)
            assert f"server closed the connection (127.0.0.1:{port})".encode() in screen
            assert term.finish() == 1
        finally:
            term.close()


# -- aecho bench: how busy bench itself was ----------------------------------------------------


def _ran(cpu: list[float]) -> Result:
    cfg = BenchConfig(host="127.0.0.1", port=7, duration=1.0).validate()
    done = replace(Result.empty(Setup.from_cfg(cfg)), messages=1000, duration_ns=1_000_000_000)
    return replace(done, cpu=cpu)


def _bench_cpu_row(result: Result) -> str:
    table = io.StringIO()
    console = Console(file=table, width=200, force_terminal=True, color_system="standard")
    report.print_table(result, console)
    return next(line for line in table.getvalue().splitlines() if "bench cpu" in line)


def test_bench_is_busy_from_90_percent_of_a_core() -> None:
    below, at = _ran([0.89]), _ran([0.90])
    assert report.busy_note(below) is None
    note = report.busy_note(at)
    assert note is not None and note.startswith("bench kept 90% of a core busy")
    assert "\x1b[33m" not in _bench_cpu_row(below)  # yellow only at 90 % or more
    assert "\x1b[33m" in _bench_cpu_row(at)


# -- aecho bench --find-max-rate: bisection to 3 % ---------------------------------------------


def _knee_at(capacity: float) -> Callable[[BenchConfig, Setup, float, int], Result]:
    """A server that answers in 1 ms up to ``capacity`` msgs/s and falls behind (20 ms)
    beyond it; closed loop it runs at capacity."""

    def measure(cfg: BenchConfig, setup: Setup, drain_s: float, goal_ns: int) -> Result:
        result = Result.empty(setup)
        result.hist = Histogram()
        if cfg.messages is not None:  # one message: is the server answering promptly?
            result.hist.record(1_000_000)
            result.messages, result.duration_ns = 1, 1_000_000
            return result
        assert cfg.duration is not None
        over = cfg.rate is None or cfg.rate > capacity
        for _ in range(100):
            result.hist.record(20_000_000 if over else 1_000_000)
        rate = capacity if cfg.rate is None else min(cfg.rate, capacity)
        result.messages = int(rate * cfg.duration)
        result.duration_ns = int(cfg.duration * 1e9)
        return result

    return measure


@pytest.mark.parametrize("capacity", [777.0, 4_321.0, 123_456.0])
def test_find_max_rate_narrows_the_answer_to_3_percent(capacity: float) -> None:
    cfg = BenchConfig(
        host="127.0.0.1", port=7, duration=1.0, max_p99_ms=5, find_max_rate=True
    ).validate()
    search = find_max_rate(cfg, Setup.from_cfg(cfg), _knee_at(capacity))
    passed = [s.rate for s in search.steps if s.rate is not None and s.passed]
    failed = [s.rate for s in search.steps if s.rate is not None and not s.passed]
    assert passed and failed, [(s.rate, s.passed) for s in search.steps]
    low, high = max(passed), min(failed)
    assert low == search.max_rate
    assert low <= capacity < high
    assert high / low - 1 <= 0.03, (low, high)
    assert capacity / 1.03 <= search.max_rate <= capacity


# -- aecho bench: the embedded server ----------------------------------------------------------


def test_bench_without_a_server_measures_its_own_with_50_connections() -> None:
    out = run_bench("--json", "-d", "0.5")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data.get("error") is None, data
    assert data["server"]["embedded"] is True
    assert data["connections"] == 50
    assert data["messages"] > 0
    assert data["errors"] == 0 and data["mismatches"] == 0


# -- offload: the server-wide byte budget ------------------------------------------------------


def test_the_pool_budget_is_8_mib() -> None:
    assert ServerConfig(port=0).pool_budget == 8 * MiB
    assert 8 * MiB == POOL_BUDGET


@pytest.mark.asyncio
async def test_connections_together_hold_at_most_8_mib_in_the_pool(tmp_path: Path) -> None:
    """64 peers send 512 KiB of 1 KiB lines each while the worker is held up: 256 KiB a
    connection would be 16 MiB, but all together stop at the budget, the rest waiting."""
    gate = tmp_path / "gate"
    gate.touch()
    line = f"{gate} ".encode().ljust(KiB - 1, b"x") + b"\n"
    peers = 64
    async with running_server(
        offload="process",
        pool_size=1,
        framing="line",
        handler="tests.handlers_for_tests:held_at_gate",
    ) as server:
        budget = server.budget
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(peers):
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(line * 512)
                writers.append(writer)

            def settled() -> bool:
                # Nothing comes back from the pool, so once every connection has stopped
                # reading, what the pool holds can only stay as it is.
                conns = list(server.connections)
                return len(conns) == peers and all(c._paused for c in conns)

            for _ in range(1000):
                if settled():
                    break
                await asyncio.sleep(0.01)
            assert settled()
            assert budget.waiting > 0  # the ones that want more stopped reading
            # Past the budget by less than one message (1 KiB, charged 256 bytes more): a
            # read that would take more than the room left is handed over in part.
            assert 8 * MiB <= budget.held < 8 * MiB + KiB + 256, budget.held
        finally:
            for writer in writers:
                writer.transport.abort()
            gate.unlink()
