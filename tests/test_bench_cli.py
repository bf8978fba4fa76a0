"""``aecho bench`` as a user runs it: the table and JSON, exact figures, failures explained in
one line, signals, the live line, the embedded server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    Echo,
    ServerProcess,
    Silent,
    SilentOnFirst,
    bench_cli,
    descendants,
    free_port,
    run_bench,
    threaded_server,
    wait_until,
)
from tests.test_workers import scrape

JSON_KEYS = {"connections", "duration_s", "messages", "msgs_per_s", "mib_per_s", "errors"}
JSON_KEYS |= {"mismatches", "latency_us"}
LATENCY_KEYS = {"p50", "p90", "p99", "p999", "max"}


def bench_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aecho", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_when_measuring(
    proc: subprocess.Popen[str], sig: int, also: Callable[[], bool] | None = None
) -> tuple[str, float]:
    """Once bench says it is measuring (its readiness line) and ``also`` holds, send
    ``sig``: (stdout, seconds until it exited).  Killed if it outlives a minute."""
    try:
        assert proc.stderr is not None
        assert "measuring" in proc.stderr.readline()
        if also is not None:
            assert wait_until(also)
        sent = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        return out, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def on_a_terminal(args: list[str], timeout: float = 60) -> tuple[int, str, bytes]:
    """Run ``aecho bench ARGS`` with stderr on a pseudo-terminal: (exit code, what the
    terminal saw, stdout)."""
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="30")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aecho", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
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
            proc.wait()
    return proc.returncode, seen.decode(errors="replace"), out


# -- output ----------------------------------------------------------------------------------------


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
    assert data["failures"] == []
    readme = {"sent_mib_per_s", "errors_by_kind", "server", "size", "reply_size"}
    readme |= {"start_unix_ns", "duration_ns", "histogram", "timeline", "failures"}
    readme |= {"bench_cpu", "bench_engine", "warnings"}
    assert data.keys() >= readme
    (share,) = data["bench_cpu"]  # one bench process, busy for part of a core
    assert 0 < share < 1.5
    assert data["server"].keys() == {"embedded", "pid", "handler", "framing", "offload"}


def test_cli_table_and_thresholds(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    code, out, err = bench_cli("127.0.0.1", str(server.port), "-n", "300", "-c", "3")
    assert code == 0, err
    assert "msgs/s" in out and "latency p99" in out and "every byte verified" in out
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


def test_host_port_in_one_argument(serve_process: Callable[..., ServerProcess]) -> None:
    v4 = serve_process()
    code, out, err = bench_cli(f"127.0.0.1:{v4.port}", "-n", "50", "-c", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["target"] == f"127.0.0.1:{v4.port}"
    v6 = serve_process("--host", "::1")
    code, out, err = bench_cli(f"[::1]:{v6.port}", "-n", "50", "-c", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["target"] == f"[::1]:{v6.port}"
    code, _, err = bench_cli(f"127.0.0.1:{v4.port}", str(v4.port), "-n", "5")
    assert code == 2
    assert "port is given twice" in err
    code, _, err = bench_cli("[::1", "-n", "5")
    assert code == 2
    assert err.count("\n") == 1


def test_the_table_and_json_name_what_was_measured() -> None:
    """With sha256 each 1,024-byte line gets a 65-byte digest line back: both sizes show,
    and the throughput in each direction is of its own size."""
    args = ["--handler", "sha256", "--framing", "line", "-n", "300", "-c", "3"]
    table = run_bench(*args)
    assert table.returncode == 0, table.stderr
    assert re.search(r"handler\W+sha256, framing line, offload inline", table.stdout)
    assert re.search(r"server\W+embedded aecho serve \(pid \d+\)", table.stdout)
    assert "1024 B out, 65 B back" in table.stdout
    volume = re.search(r"([\d.]+) MiB/s out, ([\d.]+) MiB/s back", table.stdout)
    assert volume is not None, table.stdout
    out_mib, back_mib = (float(v) for v in volume.groups())
    assert out_mib == pytest.approx(back_mib * 1024 / 65, rel=0.02)
    data = json.loads(run_bench(*args, "--json").stdout)
    assert data["server"] | {"pid": None} == {
        "embedded": True,
        "pid": None,
        "handler": "sha256",
        "framing": "line",
        "offload": "inline",
    }
    assert (data["size"], data["reply_size"]) == (1024, 65)
    assert data["bytes"] == 65 * data["messages"]


# -- exact figures ---------------------------------------------------------------------------------


def test_duration_and_rate_leave_out_the_wait_for_owed_replies() -> None:
    """One connection of four never gets a reply: bench waits --timeout for it, counts one
    timeout, and still reports the 1 s it measured and the rate over that second."""
    SilentOnFirst.accepted = 0
    with threaded_server(SilentOnFirst) as port:
        t0 = time.monotonic()
        out = run_bench("127.0.0.1", str(port), "-c", "4", "-d", "1", "--timeout", "3", "--json")
        waited = time.monotonic() - t0
    assert out.returncode == 1
    data = json.loads(out.stdout)
    assert waited >= 3  # the owed reply was waited for ...
    assert 1.0 <= data["duration_s"] < 1.05  # ... but is not part of the measured time
    assert data["msgs_per_s"] == pytest.approx(data["messages"] / data["duration_s"], rel=1e-6)
    assert data["errors_by_kind"]["timeout"] == 1
    assert sum(data["timeline"]["messages"]) == data["messages"]
    assert len(data["timeline"]["messages"]) == 10


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_early_and_reports_the_time_that_ran(
    serve_process: Callable[..., ServerProcess], workers: int
) -> None:
    metrics = free_port()
    server = serve_process("--metrics-port", str(metrics))
    proc = bench_process(
        "127.0.0.1", str(server.port), "-d", "60", "-c", "4", "--workers", str(workers), "--json"
    )
    # Some replies went out first: interrupted with none, a run has measured nothing (and
    # fails, see test_interrupted_in_the_warm_up_measured_nothing).
    out, took = interrupt_when_measuring(
        proc, signal.SIGINT, lambda: scrape(metrics)["aecho_bytes_sent_total"] > 0
    )
    assert took < 15
    assert proc.returncode == 0
    data = json.loads(out)
    assert data["interrupted"] is True
    assert data["errors"] == 0
    assert 0 < data["duration_s"] < 15
    # The timeline covers the time that ran, not the 60 s planned.
    slots = data["timeline"]["messages"]
    assert len(slots) == max(1, round(data["duration_s"] * 10))
    assert sum(slots) == data["messages"]
    assert len(data["timeline"]["latency_buckets"]) <= round(data["duration_s"]) + 1


def test_sigterm_still_reports_and_stops_the_embedded_server() -> None:
    proc = bench_process("-d", "60", "-c", "4", "--json")
    out, _ = interrupt_when_measuring(proc, signal.SIGTERM)
    data = json.loads(out)
    assert data["interrupted"] is True
    with pytest.raises(ProcessLookupError):
        os.kill(data["embedded_server_pid"], 0)


def test_a_window_too_short_for_a_reply_measured_nothing(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process()
    out = run_bench("127.0.0.1", str(server.port), "-c", "2", "-d", "1e-9", "--json")
    assert out.returncode == 1, out.stdout
    data = json.loads(out.stdout)
    assert data["messages"] == 0 and data["errors"] == 0
    assert data["failures"] == [
        "nothing was measured: no reply completed in the measured window (give a longer -d?)"
    ]
    assert out.stderr.count("nothing was measured") == 1


def test_interrupted_in_the_warm_up_measured_nothing(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process()
    proc = bench_process("127.0.0.1", str(server.port), "-d", "5", "--warmup", "60", "--json")
    out, _ = interrupt_when_measuring(proc, signal.SIGINT)
    assert proc.returncode == 1
    data = json.loads(out)
    assert data["interrupted"] is True and data["messages"] == 0
    assert data["failures"] == [
        "nothing was measured: interrupted before a reply completed in the measured window"
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_while_connecting_still_reports(workers: int) -> None:
    """Interrupted in the connect phase (here slowed by --connect-rate), bench still prints
    its JSON object and fails in one line: nothing was measured."""
    accepted = threading.Event()

    class Counted(Echo):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            accepted.set()

    with threaded_server(Counted) as port:
        proc = bench_process(
            "127.0.0.1", str(port), "-c", "20", "--connect-rate", "2", "-d", "5", "--json",
            "--workers", str(workers),
        )  # fmt: skip
        try:
            assert accepted.wait(30)  # readiness: bench is connecting
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            assert time.monotonic() - t0 < 5  # not the 10 s the other connections would take
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1, err
    data = json.loads(out)
    assert data["interrupted"] is True and data["messages"] == 0
    assert data["failures"] == [
        "nothing was measured: interrupted before a reply completed in the measured window"
    ]
    assert "Traceback" not in err


def test_no_replies_means_no_percentiles_and_no_verified_claim() -> None:
    with threaded_server(Silent) as port:
        args = ["127.0.0.1", str(port), "-c", "2", "-d", "0.3", "--timeout", "0.5"]
        table = run_bench(*args)
        data = json.loads(run_bench(*args, "--json").stdout)
    assert table.returncode == 1
    assert "verified" not in table.stdout
    assert re.search(r"latency p99\s+│?\s*-", table.stdout), table.stdout
    assert data["messages"] == 0
    assert set(data["latency_us"].values()) == {None}
    assert data["errors_by_kind"]["timeout"] == 2


def test_every_connection_closed_ends_the_run() -> None:
    """-n with a server that hangs up on everyone: the run ends, it does not wait forever."""

    class HangUp(Echo):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data[: len(data) // 2])
            self.transport.close()

    with threaded_server(HangUp) as port:
        t0 = time.monotonic()
        code, out, _ = bench_cli("127.0.0.1", str(port), "-n", "1000", "-c", "3", "--json")
        assert time.monotonic() - t0 < 10
    assert code == 1
    assert json.loads(out)["errors_by_kind"]["short"] == 3


def test_a_close_between_replies_is_closed_and_one_within_a_reply_is_short() -> None:
    """A server that hangs up after whole replies closed the connection; one that hangs up
    in the middle of a reply cut it short.  In a closed loop a message is owed either way."""

    class WholeThenClose(Echo):
        """Answers five messages, then closes on the sixth, having read all of it (no
        unread bytes: a FIN, not a reset)."""

        replies = 0

        def data_received(self, data: bytes) -> None:
            if self.replies == 5:
                self.transport.close()
                return
            self.transport.write(data)
            self.replies += 1

    with threaded_server(WholeThenClose) as port:
        code, out, err = bench_cli(
            "127.0.0.1", str(port), "-c", "3", "-s", "64", "-d", "5", "--json"
        )
    assert code == 1
    data = json.loads(out)
    assert data["errors_by_kind"]["closed"] == 3 and data["errors_by_kind"]["short"] == 0
    assert "3 closed by server: the server closed the connection with 1 reply owed" in err, err


# -- failures, one line each, and JSON whatever happens ------------------------------------------


def test_cli_nothing_listening() -> None:
    port = free_port()
    code, out, err = bench_cli("127.0.0.1", str(port), "-n", "10")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "nothing is listening on 127.0.0.1:" in err
    code, out, err = bench_cli("127.0.0.1", str(port), "-n", "10", "-c", "3", "--json")
    assert code == 1
    assert err.count("\n") == 1
    data = json.loads(out)  # CI can still parse what happened
    assert data.keys() >= JSON_KEYS
    assert data["error"] == err.strip().removeprefix("aecho: error: ")
    assert data["messages"] == 0
    assert data["errors_by_kind"]["connect"] == 3
    assert data["latency_us"]["p99"] is None
    assert data["started_at"] is None  # it never started


def test_json_when_the_embedded_server_cannot_start(tmp_path: Path) -> None:
    out = run_bench("--json", "-n", "10", env={**os.environ, "LISTEN_PID": "x", "LISTEN_FDS": "1"})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "the embedded server did not start" in out.stderr
    data = json.loads(out.stdout)
    assert "embedded server did not start" in data["error"]


def test_connection_limit_is_named(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process("--max-connections", "3")
    code, _, err = bench_cli("127.0.0.1", str(server.port), "-n", "200", "-c", "6", "--json")
    assert code == 1
    assert "connection limit reached" in err
    assert "file descriptors" not in err.split("connection limit reached")[0]


def test_a_full_server_while_connecting_is_counted_in_full(
    serve_process: Callable[..., ServerProcess],
) -> None:
    """With --connect-rate, each connection the full server turns away leaves none open
    for a moment: bench must go on connecting (and count every refusal), not take it for
    the end of the run."""
    server = serve_process("--max-connections", "1")
    with socket.create_connection(("127.0.0.1", server.port)) as holder:
        holder.sendall(b"x")
        assert holder.recv(1) == b"x"  # it holds the one place
        code, out, _ = bench_cli(
            "127.0.0.1", str(server.port), "-c", "6", "--connect-rate", "20", "-d", "0.5",
            "--json",
        )  # fmt: skip
    assert code == 1
    assert json.loads(out)["errors_by_kind"]["refused"] == 6


def test_one_connection_turned_away_while_connecting_does_not_end_the_run() -> None:
    class TurnFirstAway(Echo):
        seen = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            TurnFirstAway.seen += 1
            if TurnFirstAway.seen == 1:
                transport.close()

    with threaded_server(TurnFirstAway) as port:
        code, out, _ = bench_cli(
            "127.0.0.1", str(port), "-c", "3", "--connect-rate", "20", "-d", "0.5", "--json"
        )
    data = json.loads(out)
    assert code == 1  # one refusal
    assert data["errors_by_kind"]["refused"] == 1
    assert data["messages"] > 0 and data["connected"] == 2  # the two it let in


@pytest.mark.parametrize("workers", [1, 2])
def test_too_few_file_descriptors_is_named(
    serve_process: Callable[..., ServerProcess], workers: int
) -> None:
    """A server that cannot open more sockets turns connections away like a full one; the
    diagnosis tells the two apart.  With --workers, one process may finish (and close its
    connections) before another looks at the server: the look is taken when trouble starts."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    server = serve_process(preexec_fn=low_limit)
    for _ in range(1 if workers == 1 else 3):  # the race it guards against is not every run's
        code, _, err = bench_cli(
            "127.0.0.1", str(server.port), "-d", "1", "-c", "80", "--timeout", "2", "--json",
            "--workers", str(workers),
        )  # fmt: skip
        assert code == 1
        assert "too few file descriptors" in err, err
        assert f"pid {server.pid}" in err
        assert "connection limit" not in err


def test_cli_usage_errors() -> None:
    code, _, err = bench_cli("-d", "1", "-n", "5")
    assert code == 2
    assert "not both" in err
    code, _, err = bench_cli("--handler", "reverse")
    assert code == 2
    assert "--framing line" in err
    code, _, err = bench_cli("--workers", "3", "-c", "2")
    assert code == 2
    code, _, err = bench_cli("--plot", "out.jpg")
    assert code == 2
    assert ".png or .svg" in err


def test_bench_raises_its_own_descriptor_limit(
    serve_process: Callable[..., ServerProcess],
) -> None:
    server = serve_process()

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 4096))

    out = run_bench(
        "127.0.0.1", str(server.port), "-c", "200", "-n", "400", "--json", preexec_fn=low_soft_limit
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["connected"] == 200


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    code, out, err = bench_cli("127.0.0.1", "1", "-n", "5", "--plot", "x.png")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert "pip install -e '.[plot]'" in err


def test_fd_limit_is_explained() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    out = run_bench("127.0.0.1", "9", "-c", "500", "-n", "10", preexec_fn=low_limit)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "file descriptors" in out.stderr and "ulimit -n" in out.stderr


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
    code, _, err = bench_cli("127.0.0.1", "1", "--tls", "--cafile", "/nonexistent.pem")
    assert code == 2
    assert "--cafile /nonexistent.pem: no such file" in err


def test_a_tls_server_probed_without_tls(
    serve_process: Callable[..., ServerProcess], tls_cert: tuple[str, str]
) -> None:
    cert, key = tls_cert
    server = serve_process("--tls-cert", cert, "--tls-key", key)
    t0 = time.monotonic()
    out = run_bench("127.0.0.1", str(server.port), "-n", "10", "-c", "2", "--timeout", "3")
    assert time.monotonic() - t0 < 30
    assert out.returncode == 1
    assert out.stderr.strip().endswith("did you mean --tls?"), out.stderr
    assert "connection limit" not in out.stderr


# -- the embedded server ---------------------------------------------------------------------------


def test_embedded_mode_starts_and_stops_its_server() -> None:
    out = run_bench("-n", "500", "-c", "5", "-s", "64", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["messages"] == 500
    pid = data["embedded_server_pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped, not left behind


def test_embedded_with_process_offload() -> None:
    out = run_bench("--offload", "process", "-n", "400", "-c", "4", "-s", "64", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["messages"] == 400
    assert data["errors"] == data["mismatches"] == 0
    assert data["server"]["offload"] == "process"


def test_workers_2_with_a_rate(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    code, out, err = bench_cli(
        "127.0.0.1", str(server.port), "--workers", "2", "--rate", "2k", "-d", "2", "-c", "8",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["workers"] == 2
    assert data["errors"] == data["mismatches"] == 0
    assert data["msgs_per_s"] == pytest.approx(2000, rel=0.05)
    per_second = [sum(data["timeline"]["messages"][i : i + 10]) for i in (0, 10)]
    assert all(abs(n - 2000) <= 200 for n in per_second), per_second


# -- the live line ---------------------------------------------------------------------------------


def shown_rates(screen: str) -> list[float]:
    return [float(m.replace(",", "")) for m in re.findall(r"([\d,]+) msgs/s", screen)]


def test_live_progress_on_a_terminal(serve_process: Callable[..., ServerProcess]) -> None:
    """With stderr on a terminal, a live line shows progress and is erased; stdout gets the
    table.  Without one (every other test), stderr gets one plain line instead."""
    server = serve_process()
    code, seen, out = on_a_terminal(["127.0.0.1", str(server.port), "-c", "3", "-d", "2"])
    assert code == 0, seen
    assert "msgs/s" in seen and "p99" in seen and "errors 0" in seen
    assert " / 2 s" in seen  # elapsed of the total
    assert "\x1b[" in seen  # drawn in place with terminal controls, not printed line by line
    assert "measuring with" not in seen
    assert b"msgs/s" in out and b"latency p99" in out
    assert b"\x1b[" not in out  # the table on a pipe is plain text


def test_live_rate_with_two_workers(serve_process: Callable[..., ServerProcess]) -> None:
    """Each worker measures its own rate; the live line shows their sum, not a rate made of
    two workers' reports arriving a moment apart."""
    server = serve_process()
    args = ["127.0.0.1", str(server.port), "--workers", "2", "--rate", "2000", "-c", "4"]
    code, seen, _ = on_a_terminal([*args, "-d", "3"])
    assert code == 0, seen
    rates = shown_rates(seen)
    assert len(rates) >= 3, seen
    assert max(rates) <= 3000, rates
    assert statistics.median(rates) == pytest.approx(2000, rel=0.25), rates


def test_warming_up_shows_no_rate(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    args = ["127.0.0.1", str(server.port), "-c", "2", "--warmup", "1.5", "-d", "1"]
    code, seen, _ = on_a_terminal(args)
    assert code == 0, seen
    plain = re.sub(r"\x1b\[[0-9;]*m", "", seen)  # styles (bold, colours) off; redraws stay
    frames = [f for f in re.split(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n", plain) if f.strip()]
    warming = [f for f in frames if "warming up" in f]
    assert warming, seen
    assert not any("msgs/s" in f for f in warming), warming
    assert any("msgs/s" in f for f in frames if "warming up" not in f)


def _group_bench(*args: str) -> subprocess.Popen[str]:
    """``aecho bench ARGS`` in a process group of its own: Ctrl-C on a terminal reaches
    every process of the group, bench's spawned workers and embedded server too."""
    return subprocess.Popen(
        [sys.executable, "-m", "aecho", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _handles(pid: int) -> bool:
    """Whether ``pid`` neither ignores SIGINT nor SIGTERM (it does while starting workers)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return not ignored & ((1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1)))


def _interrupt_group(proc: subprocess.Popen[str], sig: int, times: int = 1) -> tuple[str, str]:
    try:
        for _ in range(times):
            os.killpg(proc.pid, sig)
            time.sleep(0.06)  # the keys of an impatient user, not a readiness wait
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("where", ["workers-starting", "embedded-server-starting"])
def test_ctrl_c_before_anything_started_still_reports(
    serve_process: Callable[..., ServerProcess], sig: int, where: str
) -> None:
    if where == "workers-starting":
        server = serve_process()
        proc = _group_bench(
            "127.0.0.1", str(server.port), "-c", "4", "--workers", "2", "-d", "5", "--json"
        )
    else:
        proc = _group_bench("-c", "4", "-d", "5", "--json")
    # Readiness: bench has started its children (its workers, still importing, or the
    # embedded server, still starting), and handles Ctrl-C again.
    wanted = 2 if where == "workers-starting" else 1
    assert wait_until(lambda: len(descendants(proc.pid)) >= wanted and _handles(proc.pid), 30)
    out, err = _interrupt_group(proc, sig)
    assert "Traceback" not in err, err
    assert proc.returncode == 1, err
    data = json.loads(out)
    assert data["messages"] == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aecho"), err


def test_ctrl_c_pressed_again_and_again_still_reports(
    serve_process: Callable[..., ServerProcess],
) -> None:
    metrics = free_port()
    server = serve_process("--metrics-port", str(metrics))
    proc = _group_bench(
        "127.0.0.1", str(server.port), "-c", "4", "--workers", "2", "-d", "60", "--json"
    )
    assert proc.stderr is not None
    assert "measuring" in proc.stderr.readline()  # readiness: printed once load starts
    assert wait_until(lambda: scrape(metrics)["aecho_bytes_sent_total"] > 0)
    out, err = _interrupt_group(proc, signal.SIGINT, times=5)
    assert "Traceback" not in err, err
    data = json.loads(out)  # whole, however often Ctrl-C came while it was made
    assert data["interrupted"] is True and data["messages"] > 0
    # Presses after the first cut short the wait for replies owed (timeouts, if any were
    # still owed), then are ignored: the exit status is the run's own.
    assert proc.returncode == (1 if data["errors"] else 0), err
