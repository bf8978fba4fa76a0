"""CLI wiring: options map to the exact config; mistakes are one line and a non-zero exit."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from aecho import cli
from aecho.commandline import Command, Group
from aecho.config import BenchConfig, ClientConfig, Framing, LoopKind, Offload, ServerConfig
from tests.conftest import ServerProcess, run_aecho, wait_until

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
    ("args", "host", "port"),
    [
        (["example.org:9000"], "example.org", 9000),
        (["127.0.0.1:7007"], "127.0.0.1", 7007),
        (["[::1]:9000"], "::1", 9000),
        (["[::1]"], "::1", 7007),
        (["::1"], "::1", 7007),
        (["::1", "9000"], "::1", 9000),
        ([":9000"], "127.0.0.1", 9000),
        ([], "127.0.0.1", 7007),
    ],
)
def test_client_takes_host_port_in_one_argument(
    captured: list[object], args: list[str], host: str, port: int
) -> None:
    result = runner.invoke(cli.app, ["client", *args])
    assert result.exit_code == 0, result.output
    assert captured == [ClientConfig(host=host, port=port)]


def test_client_timeout_takes_units(captured: list[object]) -> None:
    result = runner.invoke(cli.app, ["client", "--timeout", "500ms", "--connect-timeout", "2s"])
    assert result.exit_code == 0, result.output
    assert captured == [ClientConfig(timeout=0.5, connect_timeout=2.0)]


def test_tls_flag_is_spelled_the_same_on_client_and_bench(captured: list[object]) -> None:
    group = typer.main.get_command(cli.app)
    assert isinstance(group, Group)
    spellings = {
        name: [(p.opts, p.secondary_opts) for p in group.commands[name].params if p.name == "tls"]
        for name in ("client", "bench")
    }
    assert spellings["client"] == spellings["bench"] == [(["--tls"], ["--no-tls"])]
    result = runner.invoke(cli.app, ["client", "--tls", "--no-tls"])
    assert result.exit_code == 0, result.output
    assert captured == [ClientConfig(tls=False)]


def test_workers_map_to_the_config(captured: list[object]) -> None:
    result = runner.invoke(cli.app, ["serve", "-w", "3", "--no-reuse-port"])
    assert result.exit_code == 0, result.output
    assert captured == [ServerConfig(workers=3, reuse_port=False)]
    captured.clear()
    result = runner.invoke(cli.app, ["serve", "--workers", "auto"])
    assert result.exit_code == 0, result.output
    assert captured == [ServerConfig(workers=os.cpu_count() or 1)]


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
        (["client", "localhost", "99999"], "PORT"),
        (["client", "localhost:99999"], "from 0 to 65535"),
        (["client", "localhost:7007", "7008"], "leave out PORT"),
        (["client", "[::1:7007"], "[::1]:7007"),
        (["client", "--timeout", "-1"], "--timeout"),
        (["client", "--timeout", "soon"], "--timeout"),
        (["serve", "--workers", "some"], "--workers"),
        (["serve", "--workers", "0"], "--workers"),
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


def test_port_in_use_is_one_line_and_exit_1(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    out = run_aecho("serve", "--port", str(server.port))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"aecho: error: cannot listen on 127.0.0.1:{server.port}: address already in use: "
        "is another server on that port? Choose another --port, or --port 0 for any free port"
    ]


def test_bad_host_is_one_line_and_exit_1() -> None:
    out = run_aecho("serve", "--host", "no-such-host.invalid", "--port", "0")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot resolve --host 'no-such-host.invalid'" in lines[0]


def test_unknown_handler_is_one_line_and_exit_1() -> None:
    out = run_aecho("serve", "--port", "0", "--handler", "nope")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown handler 'nope'" in lines[0]


def test_usage_error_from_the_real_command_is_one_line() -> None:
    out = run_aecho("serve", "--port", "x")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_python_dash_m_and_help_work() -> None:
    out = run_aecho("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout
    assert "client" in out.stdout


def test_listening_line_reports_the_real_port_for_ipv6(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process("--host", "::1")
    assert server.host == "::1"
    assert server.port > 0
    # The line is written before READY is sent; the reader thread may be a moment behind.
    assert wait_until(lambda: f"listening on [::1]:{server.port}" in server.output)


# -- conventions a new user expects -------------------------------------------------------------

WIDE = {"COLUMNS": "300"}  # one help row per option


def commands() -> dict[str, Any]:
    group = typer.main.get_command(cli.app)
    assert isinstance(group, Group)
    return dict(group.commands)


def test_every_command_keeps_the_conventions() -> None:
    for name, command in commands().items():
        assert isinstance(command, Command), f"{name}: use @app.command(cls=Command)"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = runner.invoke(cli.app, [flag])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"aecho {importlib.metadata.version('aecho')} (CPython 3.")
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize(
    "args", [[], *([name] for name in ("serve", "stop", "status", "client", "bench"))]
)
def test_help_shows_no_value_for_flags_and_no_stray_space(args: list[str]) -> None:
    result = runner.invoke(cli.app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    assert " ." not in result.stdout  # "Server port ." was a default swallowed as markup
    assert "repeatable ." not in result.stdout


@pytest.mark.parametrize("name", ["serve", "stop", "status", "client", "bench"])
def test_help_shows_every_default(name: str) -> None:
    help_text = runner.invoke(cli.app, [name, "--help"], env=WIDE).stdout
    command = commands()[name]
    for param in command.params:
        if param.param_type_name != "option" or param.is_flag or param.count:
            continue
        if param.default is None and not isinstance(param.show_default, str):
            continue  # nothing by default (--unix, --tls-cert, ...)
        longest = max(param.opts, key=len)
        rows = [line for line in help_text.splitlines() if re.search(rf"│ {longest}\s", line)]
        assert len(rows) == 1 and "[default: " in rows[0], (longest, rows)


def test_bench_duration_default_is_shown_and_n_alone_still_counts_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    help_text = runner.invoke(cli.app, ["bench", "--help"], env=WIDE).stdout
    assert re.search(r"│ --duration\s+-d\s.*\[default: 10\.0\]", help_text), help_text
    seen: list[BenchConfig] = []

    def fake_bench(config: BenchConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("aecho.bench.main", fake_bench)
    assert runner.invoke(cli.app, ["bench", "-n", "5"]).exit_code == 0
    assert runner.invoke(cli.app, ["bench"]).exit_code == 0
    assert [(c.duration, c.messages) for c in seen] == [(None, 5), (10.0, None)]
    both = runner.invoke(cli.app, ["bench", "-n", "5", "-d", "3"])
    assert both.exit_code == 2
    assert "either -d/--duration or -n/--messages" in both.output


def test_bench_workers_take_a_number_or_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench --workers is spelled as serve's: N, or auto for one per CPU."""
    seen: list[BenchConfig] = []

    def fake_bench(config: BenchConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("aecho.bench.main", fake_bench)
    cpus = os.cpu_count() or 1
    for spelled in ("3", "auto"):
        result = runner.invoke(cli.app, ["bench", "-c", "500", "--workers", spelled])
        assert result.exit_code == 0, result.output
    # auto never asks for more processes than there are connections to share out.
    result = runner.invoke(cli.app, ["bench", "-c", "1", "--workers", "auto"])
    assert result.exit_code == 0, result.output
    assert [c.workers for c in seen] == [3, cpus, 1]
    for bad, said in (("0", "at least 1 (or auto)"), ("two", "a whole number or auto")):
        result = runner.invoke(cli.app, ["bench", "--workers", bad])
        assert result.exit_code == 2 and said in result.output, result.output


def test_serve_help_is_grouped_into_panels() -> None:
    help_text = runner.invoke(cli.app, ["serve", "--help"], env=WIDE).stdout
    panels = re.findall(r"╭─ (.+?) ─", help_text)
    assert panels == [
        "Options",
        "Listening",
        "Messages and offload",
        "Connections",
        "Logs and metrics",
        "Daemon",
        "TLS and PROXY protocol",
        "Processes",
    ]


def test_short_flags(captured: list[object]) -> None:
    result = runner.invoke(cli.app, ["serve", "-H", "::1", "-p", "0", "-v"])
    assert result.exit_code == 0, result.output
    assert captured == [ServerConfig(host="::1", port=0, log_level="DEBUG")]


@pytest.mark.parametrize(
    ("args", "level"),
    [
        ([], "INFO"),
        (["--log-level", "WARNING"], "WARNING"),
        (["--log-level", "warning", "-v"], "INFO"),
        (["--log-level", "warning", "-vv"], "DEBUG"),
        (["-vvv"], "DEBUG"),
        (["--verbose", "--log-level", "error"], "WARNING"),
    ],
)
def test_each_v_logs_one_level_more(captured: list[object], args: list[str], level: str) -> None:
    result = runner.invoke(cli.app, ["serve", *args])
    assert result.exit_code == 0, result.output
    assert len(captured) == 1
    assert isinstance(captured[0], ServerConfig)
    assert captured[0].log_level == level


def test_shell_completion_is_available() -> None:
    shown = runner.invoke(cli.app, ["--show-completion", "bash"])
    assert shown.exit_code == 0
    assert "_AECHO_COMPLETE=complete_bash" in shown.stdout
    env = {
        "_AECHO_COMPLETE": "complete_bash",
        "COMP_WORDS": "aecho serve --framing ",
        "COMP_CWORD": "3",
    }
    out = subprocess.run(
        [sys.executable, "-m", "aecho"], env={**os.environ, **env}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0
    assert out.stdout.split() == ["raw", "line"]


def test_bare_aecho_prints_help_and_no_error_line() -> None:
    out = run_aecho()
    assert out.returncode == 2
    assert out.stdout == ""
    assert "Usage: aecho [OPTIONS] COMMAND [ARGS]..." in out.stderr
    assert "serve" in out.stderr
    assert "error" not in out.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--port", "x"], "invalid value for -p/--port: 'x' is not a whole number"),
        (["serve", "-p", "70000"], "invalid value for -p/--port: 70000 is more than 65535"),
        (["serve", "--framing", "xml"], "invalid value for --framing: 'xml' is not one of 'raw'"),
        (["serve", "--log-level", "loud"], "invalid value for --log-level: 'loud' is not one of"),
        (["bench", "-c", "0"], "invalid value for -c/--connections: 0 is less than 1"),
        (["bench", "--max-p99", "soon"], "invalid value for --max-p99: 'soon' is not a number"),
        # NaN compares false with everything: as a gate it would pass every run.
        (["bench", "-d", "1", "--max-p99", "nan"], "--max-p99 must be a positive number of"),
        (["bench", "-d", "1", "--max-p99", "inf"], "--max-p99 must be a positive number of"),
        (["bench", "-d", "1", "--min-rate", "nan"], "--min-rate must be 0 or more messages"),
        (["bench", "-d", "1", "--min-rate", "inf"], "--min-rate must be 0 or more messages"),
        (["bench", "--find-max-rate", "--max-p99", "nan"], "--max-p99 must be a positive"),
        (["bench", "-d", "1", "--rate", "1e-300"], "--rate must be at least 0.001 messages"),
        (["bench", "-d", "5x"], "invalid value for -d/--duration: '5x' is not a duration: use"),
        (["serve", "--daemon=yes"], "option '--daemon' does not take a value"),
        (["serve", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["stop"], "which server? give --pidfile PATH, or the --port N"),
        (["status", "--port", "7007", "--pidfile", "x.pid"], "give one of --pidfile and --port"),
        (["frob"], "no such command 'frob'"),
        # An unset shell variable is a mistake, not "not given".
        (["serve", "--unix", ""], "--unix must not be empty: give a path"),
        (["serve", "--pidfile", ""], "--pidfile must not be empty: give a path"),
        (["serve", "--log-file", ""], "--log-file must not be empty: give a path"),
        (["serve", "--tls-cert", "", "--tls-key", "k"], "--tls-cert must not be empty"),
        (["stop", "--pidfile", ""], "--pidfile must not be empty: give a path"),
        (["status", "--unix", ""], "--unix must not be empty: give a path"),
        (["client", "--unix", ""], "--unix must not be empty: give a path"),
        (["bench", "--unix", "", "-d", "1"], "--unix must not be empty: give a path"),
        (["bench", "127.0.0.1", "1", "-d", "1", "--plot", ""], "--plot must not be empty"),
    ],
)
def test_usage_errors_read_as_one_plain_line(args: list[str], expected: str) -> None:
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2
    where = "aecho" if args == ["frob"] else f"aecho {args[0]}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"aecho: error: {expected}")
    assert lines[0].endswith(f" (see '{where} --help')")
    for leak in ("Input should", "Value error", "Invalid value for '"):
        assert leak not in result.stderr


def test_runtime_failures_use_the_same_prefix(tmp_path: Path) -> None:
    out = run_aecho("client", "--unix", str(tmp_path / "nothing.sock"))
    assert out.returncode == 1
    assert out.stderr.startswith("aecho: error: ")
    assert len(out.stderr.splitlines()) == 1
