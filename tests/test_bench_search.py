"""``--find-max-rate``: the search on a model server, its knee against a sweep of fixed rates
on a real one, and what the command prints."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from aecho.bench import runner
from aecho.bench.histogram import Histogram
from aecho.bench.results import Result, Setup
from aecho.bench.search import MAX_STEPS, PRECISION, Measure, find_max_rate, passes, settle
from aecho.config import BenchConfig, Framing
from tests.conftest import (
    ServerProcess,
    Silent,
    SilentOnFirst,
    bench_cli,
    run_bench,
    threaded_server,
)


def model(capacity: float, calls: list[float | None]) -> Measure:
    """A server that answers in 1 ms below ``capacity`` msgs/s and falls behind above it;
    closed loop, it runs at capacity with 20 ms replies."""

    def measure(cfg: BenchConfig, setup: Setup, drain_s: float, goal_ns: int) -> Result:
        if cfg.messages is None:
            calls.append(cfg.rate)
        rate = capacity if cfg.rate is None else min(cfg.rate, capacity)
        latency = 20_000_000 if cfg.rate is None or cfg.rate > capacity else 1_000_000
        if cfg.messages is not None:  # one message, to see that the server is idle again
            assert cfg.duration is None and cfg.connections == 1
            result = Result.empty(setup)
            result.hist.record(1_000_000)
            result.messages, result.duration_ns = 1, 1_000_000
            return result
        result = Result.empty(setup)
        result.hist = Histogram()
        for _ in range(100):
            result.hist.record(latency)
        assert cfg.duration is not None
        result.messages = int(rate * cfg.duration)
        result.duration_ns = int(cfg.duration * 1e9)
        return result

    return measure


def search_cfg(**kw: object) -> BenchConfig:
    base = BenchConfig(host="127.0.0.1", port=1, duration=1.0, max_p99_ms=5, find_max_rate=True)
    return replace(base, **kw).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("capacity", [3.0, 950.0, 123_456.0])
def test_search_finds_a_model_servers_capacity(capacity: float) -> None:
    calls: list[float | None] = []
    cfg = search_cfg()
    search = find_max_rate(cfg, Setup.from_cfg(cfg), model(capacity, calls))
    assert calls[0] is None  # the closed-loop probe first
    assert search.max_rate is not None
    assert capacity * (1 - 2 * PRECISION) <= search.max_rate <= capacity
    assert len(search.steps) <= 10 < MAX_STEPS
    assert all(s.passed == (s.rate is not None and s.rate <= capacity) for s in search.steps)


def test_search_ramps_up_past_a_slow_probe() -> None:
    """A probe with too few connections underestimates the server: the ramp doubles."""
    calls: list[float | None] = []
    measure = model(10_000, calls)

    def slow_probe(cfg: BenchConfig, setup: Setup, drain_s: float, goal_ns: int) -> Result:
        result = measure(cfg, setup, drain_s, goal_ns)
        if cfg.rate is None:
            result.messages //= 10
        return result

    cfg = search_cfg()
    search = find_max_rate(cfg, Setup.from_cfg(cfg), slow_probe)
    assert calls[1:4] == [1000, 2000, 4000]
    assert search.max_rate is not None and search.max_rate >= 10_000 * (1 - 2 * PRECISION)


def test_nothing_passes() -> None:
    calls: list[float | None] = []
    cfg = search_cfg(max_p99_ms=0.5)  # the model never answers in under 1 ms
    search = find_max_rate(cfg, Setup.from_cfg(cfg), model(100, calls))
    assert search.max_rate is None
    assert len(search.steps) < MAX_STEPS


@pytest.mark.slow
def test_knee_of_a_server_of_known_capacity(serve_process: Callable[..., ServerProcess]) -> None:
    """``serve --handler burn`` costs about 1 ms of CPU a line, so about 1,000 lines/s on
    one core (less on a busy machine).  The search must land within 15 % of the knee a
    sweep of fixed rates shows.  The sweep's steps alternate with the search's, so both
    see the same machine: its load drifts, and the server's capacity with it."""

    def first_in_line() -> None:
        # The server's capacity is its share of a core: on a busy machine that share swings
        # by half from one second to the next, unless the server goes first (when allowed).
        with contextlib.suppress(OSError):
            os.nice(-10)

    server = serve_process("--handler", "burn", "--framing", "line", preexec_fn=first_in_line)
    goal_ms = 200.0  # tolerates the stalls of a busy machine; the knee stays sharp
    cfg = BenchConfig(
        host="127.0.0.1", port=server.port, connections=20, size=64, framing=Framing.line,
        duration=1.0, warmup=0.3, max_p99_ms=goal_ms, timeout=5, find_max_rate=True,
    ).validate()  # fmt: skip
    setup = Setup.from_cfg(cfg)
    grid: list[float] = []
    sweep: list[tuple[float, bool]] = []

    def sweep_step(step_cfg: BenchConfig, drain_s: float, goal_ns: int) -> None:
        rate = grid[len(sweep)]
        fixed = replace(step_cfg, rate=rate)
        result = runner.measure_step(fixed, replace(setup, rate=rate), drain_s, goal_ns)
        sweep.append((rate, passes(result, goal_ms, rate)))
        if not sweep[-1][1]:
            settle(fixed, setup, runner.measure_step, goal_ns)

    def alternate(step_cfg: BenchConfig, step_setup: Setup, drain_s: float, goal_ns: int) -> Result:
        # A sweep step before each search step (after the search let the server settle).
        if step_cfg.messages is None and len(sweep) < len(grid):
            sweep_step(step_cfg, drain_s, goal_ns)
        result = runner.measure_step(step_cfg, step_setup, drain_s, goal_ns)
        if not grid:  # the probe: the sweep covers 0.6 to 1.4 times what it found
            shares = (1.0, 0.8, 1.2, 0.9, 1.1, 0.7, 1.3, 0.6, 1.4)
            grid.extend(round(result.msgs_per_s * k) for k in shares)
        return result

    search = find_max_rate(cfg, setup, alternate)
    found = search.max_rate
    assert found is not None, [(s.rate, s.passed) for s in search.steps]
    assert 150 <= found <= 1300  # about 1,000 lines/s of one core's time
    step_cfg = replace(cfg, find_max_rate=False, max_p99_ms=None)
    while len(sweep) < len(grid):
        sweep_step(step_cfg, 1.0, int(goal_ms * 1e6))
    assert abs(sweep_knee(sweep) - found) <= 0.15 * found, (found, sorted(sweep))


def sweep_knee(sweep: list[tuple[float, bool]]) -> float:
    """Where a sweep turns from passing to failing: the threshold that leaves the fewest
    steps on the wrong side (a passing step above it, a failing one below), so one step
    upset by the machine's other load does not move the knee; the middle of a tie."""
    rates = sorted(rate for rate, _ in sweep)
    cuts = [rates[0] / 2, *((a + b) / 2 for a, b in itertools.pairwise(rates)), rates[-1] * 2]
    wrong = {cut: sum(ok == (rate > cut) for rate, ok in sweep) for cut in cuts}
    best = [cut for cut in cuts if wrong[cut] == min(wrong.values())]
    # A cut lies between two rates; the knee is the last passing rate below it.
    return statistics.median(max((r for r in rates if r < cut), default=0) for cut in best)


def test_sweep_knee() -> None:
    assert sweep_knee([(100, True), (200, True), (300, False), (400, False)]) == 200
    assert sweep_knee([(100, True), (200, True), (300, True), (400, True)]) == 400
    assert sweep_knee([(100, False), (200, False)]) == 0
    # 300 failed and 400 passed: as likely the machine as the server; the knee is between.
    assert sweep_knee([(100, True), (200, True), (300, False), (400, True), (500, False)]) == 300


# -- the command -----------------------------------------------------------------------------------


def test_cli_search_table_json_and_plot(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    server = serve_process("--handler", "burn", "--framing", "line")
    args = ["127.0.0.1", str(server.port), "--framing", "line", "-s", "64", "-c", "10"]
    args += ["--find-max-rate", "--max-p99", "50", "-d", "0.5", "--warmup", "0.2"]
    png = tmp_path / "knee.png"
    code, out, err = bench_cli(*args, "--json", "--plot", str(png))
    assert code == 0, err
    data = json.loads(out)
    assert data["max_p99_ms"] == 50
    assert data["max_rate"] > 0
    steps = data["steps"]
    assert steps[0]["kind"] == "probe" and steps[0]["target_rate"] is None
    best = max((s for s in steps if s["passed"]), key=lambda s: s["target_rate"])
    assert best["target_rate"] == data["max_rate"]
    assert best["latency_us"]["p99"] <= 50_000 == data["max_p99_ms"] * 1000
    above = [s for s in steps[1:] if s["target_rate"] > data["max_rate"]]
    assert above and not any(s["passed"] for s in above)
    # How busy bench itself was at each step (one process), to tell its limit from the knee;
    # none for a step stopped too early to tell.
    shares = [s["bench_cpu"] for s in steps]
    assert all(cpu == [] or (len(cpu) == 1 and 0 <= cpu[0] < 1.5) for cpu in shares), shares
    assert any(cpu for cpu in shares), shares
    assert re.findall(r"step [\d,]+: .* (pass|fail)", err)  # one line per step as it ends
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run_bench(*args)
    assert table.returncode == 0, table.stderr
    answer = re.search(
        r"max sustainable rate: ([\d,]+) msgs/s \(p99 [\d.]+ \w+ at \1\)", table.stdout
    )
    assert answer is not None, table.stdout
    for column in ("target/s", "achieved/s", "p50", "p99", "p99.9", "errors", "result"):
        assert column in table.stdout


def test_search_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 2 s after a 0.5 s warm-up unless -d / --warmup say otherwise."""
    seen: list[BenchConfig] = []

    def capture(cfg: BenchConfig) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr(runner, "main", capture)
    assert bench_cli("--find-max-rate", "--max-p99", "5")[0] == 0
    assert bench_cli("--find-max-rate", "--max-p99", "5", "-d", "1", "--warmup", "0")[0] == 0
    assert bench_cli("-n", "5")[0] == 0
    assert [(c.duration, c.warmup) for c in seen] == [(2.0, 0.5), (1.0, 0.0), (None, 0.0)]


def test_what_passes() -> None:
    """A step passes with p99 within the goal, no error, and 90 % of its rate done."""
    result = Result.empty(Setup.from_cfg(search_cfg()))
    for _ in range(100):
        result.hist.record(4_000_000)
    result.messages, result.duration_ns = 900, 1_000_000_000
    assert passes(result, 5, 1000)
    assert not passes(result, 5, 1001)  # 90 % of 1001 is 900.9: 900 msgs/s falls short
    assert not passes(result, 3, 900)
    result.errors["timeout"] = 1
    assert not passes(result, 5, 900)


def test_cli_search_usage() -> None:
    code, _, err = bench_cli("--find-max-rate")
    assert code == 2
    assert "--max-p99" in err
    code, _, err = bench_cli("--find-max-rate", "--max-p99", "5", "--rate", "100")
    assert code == 2
    assert "drop --rate" in err
    code, _, err = bench_cli("--find-max-rate", "--max-p99", "5", "-n", "100")
    assert code == 2


def test_a_server_that_never_answers_fails_fast() -> None:
    with threaded_server(Silent) as port:
        code, out, err = bench_cli(
            "127.0.0.1", str(port), "--find-max-rate", "--max-p99", "5", "-d", "0.5",
            "--timeout", "1", "--json",
        )  # fmt: skip
    assert code == 1
    data = json.loads(out)
    assert data["max_rate"] is None
    assert "no rate held p99 within 5 ms" in err


def test_a_step_stopped_early_shows_the_late_replies_that_failed_it() -> None:
    """One connection of four never answers: the step stops once its replies are late, and
    its p99 counts them (at the age they had), not only the three that came back fast."""
    SilentOnFirst.accepted = 0
    goal_ns = 5_000_000
    with threaded_server(SilentOnFirst) as port:
        cfg = BenchConfig(
            host="127.0.0.1", port=port, connections=4, rate=400, duration=5.0, timeout=5.0
        ).validate()
        result = runner.measure_step(cfg, Setup.from_cfg(cfg), 1.0, goal_ns)
    assert result.aborted
    assert result.messages > 0  # the three answering connections were measured
    assert result.hist.percentile(99) > goal_ns
    assert not passes(result, goal_ns / 1e6, 400)
