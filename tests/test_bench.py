"""aecho bench's measurement against real servers: counting, verification, pacing, the
measured window, and merging the workers' results."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from aecho.bench import report, runner
from aecho.bench.connection import ERROR_KINDS, reply_function
from aecho.bench.histogram import Histogram
from aecho.bench.results import Result, Setup
from aecho.bench.search import Search, Step
from aecho.config import BenchConfig, ConfigError, Framing, LoopKind
from tests.conftest import Echo, ServerProcess, bench_cli, running_server, threaded_server


def cfg_for(port: int, **kw: Any) -> BenchConfig:
    base = BenchConfig(host="127.0.0.1", port=port, connections=4, duration=None, messages=200)
    return replace(base, **kw).validate()


def assert_clean(result: Result) -> None:
    assert result.errors == dict.fromkeys(ERROR_KINDS, 0), result.first_errors


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


# -- counting and verification (in the test's loop: asyncio and uvloop) ----------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("pipeline", [1, 4])
async def test_counts_add_up(pipeline: int) -> None:
    async with running_server() as server:
        cfg = cfg_for(server.port, connections=8, messages=None, duration=0.5, size=100)
        result = await runner.measure(replace(cfg, pipeline=pipeline))
    assert_clean(result)
    assert result.messages > 100
    # Replies owed when the window closed are waited for: latency, not throughput.
    assert result.messages <= result.hist.total <= result.messages + 8 * pipeline
    assert result.sent == result.hist.total  # every message sent was verified
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
    assert 0.4 <= result.duration_s < 0.4 + 0.05  # the warm-up is not part of the duration
    assert result.messages <= result.hist.total <= result.messages + 8
    assert len(result.timeline) <= 6


def test_cli_corrupting_server_exits_1() -> None:
    Corrupting.echoed, Corrupting.done = 0, False
    with threaded_server(Corrupting) as port:
        code, out, err = bench_cli("127.0.0.1", str(port), "-n", "500", "-c", "4", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["mismatches"] == 1
    assert "did not match" in err


def test_unverifiable_handler_is_refused() -> None:
    with pytest.raises(ConfigError, match="framing line"):
        reply_function(BenchConfig(handler="sha256"))


# -- pacing and latency ----------------------------------------------------------------------------


def test_rate_holds_within_5_percent(serve_process: Callable[..., ServerProcess]) -> None:
    server = serve_process()
    cfg = cfg_for(server.port, connections=20, messages=None, duration=3.0, rate=2000, size=64)
    result = runner.run(cfg)
    assert_clean(result)
    assert abs(result.msgs_per_s - 2000) <= 0.05 * 2000, result.messages
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


# -- how busy bench itself was ---------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("busy", [False, True])
async def test_bench_measures_its_own_cpu(
    busy: bool, serve_process: Callable[..., ServerProcess]
) -> None:
    """The share of a core the bench process used in the window: low for a light open-loop
    load, and with a thread spinning beside it, at least what the spinner itself used."""
    server = serve_process()
    cfg = cfg_for(server.port, connections=2, messages=None, duration=1.0, rate=100)
    spinning = threading.Event()
    spun: list[float] = []

    def spin() -> None:
        while not spinning.is_set():
            sum(range(1000))  # pure computation: holds a core (and the GIL, in slices)
        spun.append(time.thread_time())

    spinner = threading.Thread(target=spin, daemon=True)
    started = time.monotonic()
    if busy:
        spinner.start()
    try:
        result = await runner.measure(replace(cfg, warmup=0.2))
    finally:
        spinning.set()
        if busy:
            spinner.join()
    assert_clean(result)
    (share,) = result.cpu
    if busy:
        # A shared machine may give the spinner much less than a core: what it had is the
        # yardstick (over the whole run, the window being most of it).
        spinner_share = spun[0] / (time.monotonic() - started)
        assert share >= 0.7 * spinner_share and share > 0.2, (share, spinner_share)
    else:
        assert share < 0.3, share
    note = report.busy_note(result)
    assert (note is not None) is (share >= report.BUSY_SHARE)


@pytest.mark.asyncio
async def test_no_cyclic_collection_runs_in_the_window() -> None:
    """The collector is off while bench measures (a collection's pause would land in the
    latencies), and on again afterwards."""
    assert gc.isenabled()
    seen: list[bool] = []
    async with running_server() as server:
        cfg = cfg_for(server.port, connections=2, messages=None, duration=1.0)
        result = await runner.measure(cfg, lambda _: seen.append(gc.isenabled()))
    assert_clean(result)
    assert seen.count(False) >= 2, seen  # live reports from inside the window
    assert gc.isenabled()


def test_a_busy_bench_is_named_in_the_table_json_and_warnings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A result whose bench process kept >= 90 % of a core busy says so: a yellow row in the
    table, the JSON's warnings, and one line on stderr; the exit status is not changed."""
    cfg = BenchConfig(host="127.0.0.1", port=7, duration=1.0).validate()
    setup = Setup.from_cfg(cfg)
    ran = replace(Result.empty(setup), messages=1000, duration_ns=1_000_000_000)
    quiet = replace(ran, cpu=[0.42])
    busy = replace(ran, cpu=[0.97, 0.5])
    assert report.busy_note(quiet) is None
    note = report.busy_note(busy)
    assert note is not None and note.startswith("the busiest of 2 bench processes kept 97%")
    assert report.show(busy, replace(cfg, json=True)) == 0  # a warning, not a failure
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["bench_cpu"] == [0.97, 0.5] and data["warnings"] == [note]
    assert f"aecho bench: warning: {note}" in err
    for result, colour, text in ((busy, True, "97%, 50% of a core each"), (quiet, False, "42%")):
        table = io.StringIO()
        console = Console(file=table, width=200, force_terminal=True, color_system="standard")
        report.print_table(result, console)
        row = next(line for line in table.getvalue().splitlines() if "bench cpu" in line)
        assert ("\x1b[33m" in row) is colour, repr(row)  # yellow
        assert text in Text.from_ansi(row).plain
    report.show(quiet, replace(cfg, json=True))
    out, err = capsys.readouterr()
    assert json.loads(out)["warnings"] == [] and "warning" not in err


@pytest.mark.parametrize("loop", [LoopKind.asyncio, LoopKind.uvloop])
def test_a_light_open_loop_is_not_reported_busy(
    loop: LoopKind, serve_process: Callable[..., ServerProcess]
) -> None:
    """3,000 msgs/s on 2 connections is a small part of what one bench process sustains:
    it reads well under 90 % of a core on either loop.  (The pacer once slept for less
    than a millisecond, which uvloop rounds to a 0 ms timer: it spun, and read 100 %.)"""
    server = serve_process()
    cfg = cfg_for(server.port, connections=2, messages=None, duration=1.0, rate=3000)
    result = runner.run(replace(cfg, warmup=0.2, loop=loop))
    assert_clean(result)
    assert result.messages > 2500
    (share,) = result.cpu
    assert share < 0.5, share
    assert report.busy_note(result) is None


def test_a_window_too_short_to_tell_gets_no_share(
    serve_process: Callable[..., ServerProcess],
) -> None:
    """Over one message the share would measure bench's own bookkeeping: no figure, no
    warning, and no row in the table."""
    server = serve_process()
    for _ in range(3):
        result = runner.run(cfg_for(server.port, connections=1, messages=1, warmup=0.0))
        assert result.messages == 1 and result.cpu == []
        assert report.busy_note(result) is None


def test_the_search_warning_names_the_lowest_rate_bench_was_busy_at(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A step stopped early may have achieved next to nothing: the warning names the
    lowest rate asked for at which bench was busy, not the lowest rate achieved."""
    cfg = BenchConfig(host="127.0.0.1", port=7, duration=1.0, max_p99_ms=20.0).validate()
    setup = Setup.from_cfg(replace(cfg, find_max_rate=False, max_p99_ms=None))

    def step(rate: float, messages: int, cpu: float) -> Step:
        hist = Histogram()
        for _ in range(messages):
            hist.record(1_000_000)
        done = replace(
            Result.empty(setup), hist=hist, messages=messages, duration_ns=10**9, cpu=[cpu]
        )
        return Step(rate, done, passed=messages > 0)

    search = Search(setup, goal_ms=20.0)
    search.steps = [step(5_000, 5_000, 0.5), step(7_500, 7_500, 0.95), step(90_000, 0, 0.99)]
    report.show_search(search, replace(cfg, json=True))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("aecho bench: warning: at step 7,500 msgs/s, bench kept 95%")
