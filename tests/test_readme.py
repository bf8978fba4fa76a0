"""README.md, word for word: every ``aecho`` command it shows is a command line that parses,
and the examples that can run offline run as written and print what it says they print.

Only what a test machine cannot have is substituted: ``/run`` and ``/var/log`` paths
become a temporary directory, and a fixed port becomes ``--port 0`` and then the port
the server really bound.  Pids and uptimes match any number.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aecho import cli
from aecho.process.control import Outcome
from aecho.process.pidfile import pid_alive
from tests.conftest import ServerProcess, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 60.0
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
SEPARATORS = {"|", "||", "&&", ";"}
REDIRECTS = {"<", ">", ">>", "2>", "2>&1"}


def blocks() -> list[tuple[str, str]]:
    """Every fenced block of README.md: (language, text), indentation removed."""
    out = []
    for m in FENCE.finditer(README.read_text()):
        indent = len(m.group(1))
        text = "\n".join(line[indent:] for line in m.group(3).splitlines())
        out.append((m.group(2), text))
    return out


def command_lines() -> list[str]:
    """Shell lines of the README: every line of sh and plain blocks, and the ``$ `` lines
    of console blocks (the others there are output)."""
    lines = []
    for language, text in blocks():
        for line in text.splitlines():
            if language == "console":
                if line.startswith("$ "):
                    lines.append(line[2:])
            elif language in ("sh", ""):
                lines.append(line)
    return lines


def aecho_commands() -> list[list[str]]:
    """The ``aecho`` invocations in the README's shell lines, as argument lists."""
    found = []
    for line in command_lines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            words = [w for i, w in enumerate(segment) if not _redirection(segment, i)]
            # `aecho ...`, `.venv/bin/aecho ...`, or `systemd-socket-activate ... aecho ...`
            start = next((i for i, w in enumerate(words) if w.endswith("aecho")), None)
            if start is not None and (start == 0 or words[0] == "systemd-socket-activate"):
                found.append(words[start + 1 :])
            segment = []
    return found


def _redirection(words: list[str], i: int) -> bool:
    return words[i] in REDIRECTS or (i > 0 and words[i - 1] in REDIRECTS)


COMMANDS = aecho_commands()


def test_the_readme_shows_commands_of_every_kind() -> None:
    kinds = {args[0] if args else "" for args in COMMANDS}
    assert {"serve", "client", "bench", "stop", "status", "--version"} <= kinds, kinds


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_every_aecho_command_in_the_readme_parses(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if "--install-completion" in args:  # would edit the shell's start-up files
        args = ["--help"]
    ran: list[Any] = []

    def record(*args: Any) -> Any:
        ran.append(args)
        return Outcome(0, "ok") if isinstance(args[0], str) else 0

    monkeypatch.setattr(cli, "run_server", record)
    monkeypatch.setattr(cli, "run_client", record)
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)
    monkeypatch.setattr("aecho.bench.main", record)
    monkeypatch.setattr("aecho.bench.merge", record)
    monkeypatch.setattr("aecho.process.control.stop", record)
    monkeypatch.setattr("aecho.process.control.status", record)
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert ran or args[0] in ("--help", "--version", "-V")


# -- running the examples ---------------------------------------------------------------------


def run(line: str, cwd: Path, env: dict[str, str]) -> str:
    """A README shell line run by bash with aecho on the PATH; its stdout and stderr."""
    out = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    return out.stdout + out.stderr


def pattern(expected: str) -> re.Pattern[str]:
    """An output line of the README as a pattern: any pid, any uptime."""
    parts = re.split(r"(pid \d+|up (?:\d+[dhms] ?)+$)", expected)
    wild = {True: r"pid \d+", False: r"up (\d+[dhms] ?)+"}
    return re.compile(
        "".join(wild[p.startswith("pid")] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    )


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Run README lines in a temporary directory; daemons they start are killed at the end."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "XDG_RUNTIME_DIR": str(runtime),
    }
    pids: set[int] = set()

    def shell(line: str) -> str:
        output = run(line, tmp_path, env)
        pids.update(int(pid) for pid in re.findall(r"\(pid (\d+)", output))
        return output

    yield shell
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def console_blocks(first_command: str) -> list[list[tuple[str, list[str]]]]:
    """Console blocks whose first command starts with ``first_command``: (command, output)."""
    found = []
    for language, text in blocks():
        if language != "console" or not text.startswith(f"$ {first_command}"):
            continue
        steps: list[tuple[str, list[str]]] = []
        for line in text.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        found.append(steps)
    return found


DAEMON_BLOCKS = console_blocks("aecho serve -")


@pytest.mark.parametrize("steps", DAEMON_BLOCKS, ids=[s[0][0] for s in DAEMON_BLOCKS])
def test_the_daemon_examples_run_as_written(
    steps: list[tuple[str, list[str]]], shell: Callable[[str], str], tmp_path: Path
) -> None:
    subs = {
        "/run/aecho.pid": f"{tmp_path}/aecho.pid",
        "/var/log/aecho.log": f"{tmp_path}/aecho.log",
        "/run/user/1000": f"{tmp_path}/run",
    }
    first, _ = steps[0]
    documented = re.search(r"(?:--port|-p) (\d+)", first)
    assert documented, first
    flag, port = documented.group(0), documented.group(1)
    for i, (command, expected) in enumerate(steps):
        if i == 0:  # any free port, then the one it bound wherever the README says 7007
            command = command.replace(flag, flag.replace(port, "0"))
        for old, new in subs.items():
            command = command.replace(old, new)
            expected = [line.replace(old, new) for line in expected]
        output = shell(command)
        if command.startswith("aecho serve"):
            real = re.search(r"on 127\.0\.0\.1:(\d+) ", output)
            assert real, output
            subs[port] = real.group(1)
            expected = [line.replace(port, real.group(1)) for line in expected]
        got = output.splitlines()
        assert len(got) == len(expected), (command, output)
        for line, want in zip(got, expected, strict=True):
            assert pattern(want).fullmatch(line), (command, line, want)


def test_the_logrotate_example_reopens_the_log(shell: Callable[[str], str], tmp_path: Path) -> None:
    postrotate = next(line.strip() for line in command_lines() if "kill -USR1" in line)
    pidfile, log = tmp_path / "aecho.pid", tmp_path / "aecho.log"
    started = shell(f"aecho serve -D -p 0 --pidfile {pidfile} --log-file {log}")
    assert "aecho serving on" in started, started
    log.rename(tmp_path / "aecho.log.1")
    assert shell(postrotate.replace("/run/aecho.pid", str(pidfile))) == ""
    assert wait_until(lambda: log.exists() and "reopened log file" in log.read_text(), TIMEOUT)
    assert "stopped" in shell(f"aecho stop --pidfile {pidfile}")


def test_the_test_certificate_serves_the_tls_examples(
    shell: Callable[[str], str], tmp_path: Path, serve_process: Callable[..., ServerProcess]
) -> None:
    make = next(line for line in command_lines() if line.startswith("openssl req -x509"))
    shell(make)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert cert.exists() and key.exists()
    server = serve_process("--tls-cert", str(cert), "--tls-key", str(key))
    client = next(line for line in command_lines() if "aecho client" in line and "--tls" in line)
    assert shell(client.replace("7443", str(server.port))) == "hello\n"


def test_the_setup_puts_aecho_on_the_path(shell: Callable[[str], str]) -> None:
    setup = next(text for language, text in blocks() if text.startswith(". .venv/bin/activate"))
    venv = Path(sys.prefix)
    output = shell(setup.replace(".venv", str(venv)).replace("\n", " && "))
    assert re.fullmatch(r"aecho \S+ \(CPython 3\.\S+, uvloop \S+, Linux \S+\)\n", output), output
