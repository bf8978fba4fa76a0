"""CLI wiring: options map to the exact config; mistakes are one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from aecho import cli
from aecho.config import ClientConfig, Framing, LoopKind, Offload, ServerConfig
from tests.conftest import ServerProcess

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    seen: list[object] = []
    monkeypatch.setattr(cli, "run_server", seen.append)
    monkeypatch.setattr(cli, "run_client", seen.append)
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)
    return seen


def test_serve_defaults_map_to_the_default_config(captured: list[object]) -> None:
    result = runner.invoke(cli.app, ["serve"])
    assert result.exit_code == 0, result.output
    assert captured == [ServerConfig()]


def test_serve_options_map_to_the_exact_config(captured: list[object]) -> None:
    args = ["serve", "--host", "::1", "--port", "0", "--loop", "asyncio", "--offload",
            "process", "--pool-size", "3", "--handler", "upper", "--framing", "line",
            "--max-line", "100", "--max-connections", "7", "--idle-timeout", "2.5",
            "--graceful-timeout", "0", "--backlog", "12", "--log-level", "debug"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    expected = ServerConfig(
        host="::1",
        port=0,
        loop=LoopKind.asyncio,
        offload=Offload.process,
        pool_size=3,
        handler="upper",
        framing=Framing.line,
        max_line=100,
        max_connections=7,
        idle_timeout=2.5,
        graceful_timeout=0.0,
        backlog=12,
        log_level="DEBUG",
    )
    assert len(captured) == 1
    got = captured[0]
    assert isinstance(got, ServerConfig)
    assert got == expected


def test_client_arguments_map_to_the_config(captured: list[object]) -> None:
    result = runner.invoke(cli.app, ["client", "example.org", "9000"])
    assert result.exit_code == 0, result.output
    assert captured == [ClientConfig(host="example.org", port=9000)]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "-1"], "--port"),
        (["serve", "--framing", "xml"], "--framing"),
        (["serve", "--loop", "trio"], "--loop"),
        (["serve", "--max-connections", "0"], "--max-connections"),
        (["serve", "--idle-timeout", "-1"], "--idle-timeout"),
        (["serve", "--backlog", "zero"], "--backlog"),
        (["serve", "--log-level", "chatty"], "--log-level"),
        (["serve", "--no-such-option"], "--no-such-option"),
        (["client", "localhost", "99999"], "'port'"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    captured: list[object], args: list[str], fragment: str
) -> None:
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert fragment in lines[0]
    assert captured == []


def _aecho(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aecho", *args], capture_output=True, text=True, timeout=60
    )


def test_port_in_use_is_one_line_and_exit_1(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    out = _aecho("serve", "--port", str(server.port))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"aecho: error: cannot listen on 127.0.0.1:{server.port}: address already in use: "
        "is another server on that port? Choose another --port, or --port 0 for any free port"
    ]


def test_bad_host_is_one_line_and_exit_1() -> None:
    out = _aecho("serve", "--host", "no-such-host.invalid", "--port", "0")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot resolve --host 'no-such-host.invalid'" in lines[0]


def test_unknown_handler_is_one_line_and_exit_1() -> None:
    out = _aecho("serve", "--port", "0", "--handler", "nope")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown handler 'nope'" in lines[0]


def test_usage_error_from_the_real_command_is_one_line() -> None:
    out = _aecho("serve", "--port", "x")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_python_dash_m_and_help_work() -> None:
    out = _aecho("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout
    assert "client" in out.stdout


def test_listening_line_reports_the_real_port_for_ipv6(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--host", "::1")
    assert server.host == "::1"
    assert server.port > 0
    assert f"listening on [::1]:{server.port}" in server.output
