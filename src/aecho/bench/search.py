"""``--find-max-rate``: the highest open-loop rate a server sustains within a p99 goal.

A short closed-loop probe estimates the server's capacity; open-loop steps at that rate,
doubled or halved, bracket the knee; bisection narrows the bracket to a few percent.  Each
step is a run of its own (connect, warm up, measure), and stops as soon as it can no longer
pass: an error, or more late replies than the 1 % that p99 allows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aecho.bench.errors import BenchError
from aecho.bench.results import Result, Setup, latency_json, server_json
from aecho.config import BenchConfig

# How a step runs: (config, setup, drain_s, goal_ns) -> its result (runner.run, or a model).
Measure = Callable[[BenchConfig, Setup, float, int], Result]

PRECISION = 0.03  # stop once the bracket is this narrow (relative)
MAX_STEPS = 16
MIN_RATE = 1.0  # messages/s: below this nothing passes, and the search gives up
ACHIEVED_SHARE = 0.9  # a step passes only if it completed this share of its target rate
SETTLE_TRIES = 100
HANDLE = (0.25, 0.5, 0.75)  # shares of the answer measured for the plot's low end


@dataclass
class Step:
    rate: float | None  # the target rate; None for the closed-loop probe
    result: Result
    passed: bool

    @property
    def label(self) -> str:
        return "probe (closed loop)" if self.rate is None else f"{self.rate:,.0f}"


@dataclass
class Search:
    setup: Setup
    goal_ms: float
    steps: list[Step] = field(default_factory=list)
    interrupted: bool = False
    server_pid: int | None = None

    @property
    def best(self) -> Step | None:
        """The passing step with the highest target rate."""
        passing = [s for s in self.steps if s.passed and s.rate is not None]
        return max(passing, key=lambda s: s.rate or 0.0, default=None)

    @property
    def max_rate(self) -> float | None:
        best = self.best
        return None if best is None else best.rate


def passes(result: Result, goal_ms: float, rate: float) -> bool:
    """Did a step at ``rate`` hold p99 within the goal, without errors, at that rate?"""
    return (
        not result.error_count
        and not result.errors["mismatch"]
        and not result.aborted
        and not result.interrupted
        and result.messages > 0
        and result.hist.percentile(99) <= goal_ms * 1e6
        and result.msgs_per_s >= ACHIEVED_SHARE * rate
    )


def find_max_rate(
    cfg: BenchConfig,
    setup: Setup,
    measure: Measure,
    on_step: Callable[[Step], None] | None = None,
) -> Search:
    """Search the rates for the highest that passes (see the module's docstring).

    Raises:
        BenchError: not one connection could be opened for the first step.
    """
    assert cfg.max_p99_ms is not None
    search = Search(setup, cfg.max_p99_ms)
    base = _step_config(cfg)

    def step(rate: float | None) -> Step:
        done = _run_step(search, base, measure, rate, on_step)
        if done.result.interrupted:
            raise KeyboardInterrupt
        if rate is not None and not done.passed:
            settle(base, setup, measure, _goal_ns(search))
        return done

    try:
        probe = step(None)
        rate = _round(probe.result.msgs_per_s)
        low: float | None = None  # the highest rate that passed
        high: float | None = None  # the lowest rate that failed
        while rate >= MIN_RATE and len(search.steps) < MAX_STEPS:
            if step(rate).passed:
                low = rate
            else:
                high = rate
            if low is not None and high is not None:
                rate = _round((low + high) / 2)
                if high / low - 1 <= PRECISION or rate in (low, high):
                    break
            else:
                rate = _round(rate * 2 if high is None else rate / 2)
    except KeyboardInterrupt:
        search.interrupted = True
    except BenchError:
        if not search.steps:
            raise
        search.interrupted = True  # e.g. the server went away: report what was found
    return search


def add_handle(
    search: Search,
    cfg: BenchConfig,
    measure: Measure,
    on_step: Callable[[Step], None] | None = None,
) -> None:
    """Steps at a quarter, half and three quarters of the answer: bisection measures near
    the knee only, and a plot of latency against throughput needs the stick's handle too."""
    best = search.max_rate
    if best is None or search.interrupted:
        return
    base = _step_config(cfg)
    for share in HANDLE:
        rate = _round(best * share)
        if any(st.rate == rate for st in search.steps):
            continue
        if _run_step(search, base, measure, rate, on_step).result.interrupted:
            search.interrupted = True
            return


def _step_config(cfg: BenchConfig) -> BenchConfig:
    """What every step runs: a plain closed-loop run of ``cfg``, which a step's rate turns
    into an open-loop one."""
    return replace(cfg, find_max_rate=False, plot=None, max_p99_ms=None, rate=None)


def _goal_ns(search: Search) -> int:
    return int(search.goal_ms * 1e6)


def _run_step(
    search: Search,
    base: BenchConfig,
    measure: Measure,
    rate: float | None,
    on_step: Callable[[Step], None] | None,
) -> Step:
    """One step at ``rate`` (None: the closed-loop probe), added to the search."""
    # Replies owed when a passing step's window closes arrive within about the goal.
    drain_s = min(base.timeout, max(1.0, 20 * search.goal_ms / 1e3))
    step_cfg = base if rate is None else replace(base, rate=rate)
    result = measure(step_cfg, replace(search.setup, rate=rate), drain_s, _goal_ns(search))
    done = Step(rate, result, rate is not None and passes(result, search.goal_ms, rate))
    search.steps.append(done)
    if on_step is not None:
        on_step(done)
    return done


def settle(cfg: BenchConfig, setup: Setup, measure: Measure, goal_ns: int) -> None:
    """A failed step can leave the server working off a backlog: wait (at most --timeout)
    until one message comes back within half the goal, so the next step starts fresh.

    Raises:
        KeyboardInterrupt: Ctrl-C or SIGTERM stopped the wait: the search ends.
    """
    one = replace(cfg, connections=1, workers=1, duration=None, messages=1, warmup=0.0, rate=None)
    alone = replace(setup, connections=1, workers=1, rate=None)
    deadline = time.monotonic() + cfg.timeout
    for _ in range(SETTLE_TRIES):
        result = measure(one, alone, cfg.timeout, goal_ns)
        if result.interrupted:
            raise KeyboardInterrupt
        quick = result.messages and result.hist.max <= goal_ns / 2
        if quick or time.monotonic() > deadline:
            return


def _round(rate: float) -> float:
    """``rate`` to three significant digits: steps a person can read and repeat."""
    if rate <= 0:
        return 0.0
    return round(rate, 2 - math.floor(math.log10(rate)))


def to_json(search: Search) -> dict[str, Any]:
    """The ``--find-max-rate --json`` object: the answer and every step's figures."""
    s = search.setup
    best = search.best
    steps = []
    for st in search.steps:
        r = st.result
        steps.append(
            {
                "kind": "probe" if st.rate is None else "rate",
                "target_rate": st.rate,
                "msgs_per_s": round(r.msgs_per_s, 3),
                "messages": r.messages,
                "duration_s": round(r.duration_s, 6),
                "errors": r.error_count,
                "mismatches": r.errors["mismatch"],
                "latency_us": latency_json(r.hist, ("p50", "p90", "p99", "p999", "max")),
                "passed": st.passed,
                "stopped_early": r.aborted,
                "bench_cpu": r.cpu,
            }
        )
    return {
        "target": s.target,
        "server": server_json(s, search.server_pid),
        "connections": s.connections,
        "workers": s.workers,
        "size": s.size,
        "reply_size": s.reply_size,
        "pipeline": s.pipeline,
        "framing": s.framing,
        "handler": s.handler,
        "max_p99_ms": search.goal_ms,
        "max_rate": search.max_rate,
        "max_rate_p99_us": None
        if best is None
        else latency_json(best.result.hist, ("p99",))["p99"],
        "interrupted": search.interrupted,
        "steps": steps,
        "embedded_server_pid": search.server_pid,
    }
