"""The ``--plot`` figures: a run (latency spectrum, throughput and p99 over time) and a
``--find-max-rate`` search (latency against throughput: the hockey stick).  PNG or SVG by
the file's suffix.  matplotlib is imported here only, and only when a plot is asked for."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aecho.bench.errors import BenchError
from aecho.bench.histogram import Histogram, format_ns
from aecho.bench.results import SECOND_NS, TICK_NS, Result, Setup
from aecho.bench.search import Search, Step
from aecho.config import ConfigError
from aecho.text import needs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARKED = ((50.0, "p50"), (99.0, "p99"), (99.9, "p99.9"))
NINES = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)
COLORS = {"p50": "tab:blue", "p99": "tab:orange", "p99.9": "tab:red", "rate": "tab:green"}


def check_plot(path: str) -> None:
    """Fail before anything is measured when ``--plot path`` cannot work.

    Raises:
        BenchError: matplotlib is not installed.
        aecho.config.ConfigError: ``path`` cannot be written (no such directory, one we
            may not write to, or a directory itself).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(needs("--plot", "matplotlib", "plot")) from None
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        why = "it is a directory"
    elif not folder.is_dir():
        why = f"no such directory: {folder}"
    elif not os.access(folder, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        why = "permission denied"
    else:
        return
    raise ConfigError(f"cannot write --plot {path}: {why}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ms(ns: float) -> float:
    return ns / 1e6


def _fmt_ms(ms: float) -> str:
    return format_ns(ms * 1e6, short=True)


def caption(setup: Setup) -> str:
    """The run's parameters in one line: server, load and what the server ran."""
    load = f"rate {setup.rate:,.0f}/s" if setup.rate else f"pipeline {setup.pipeline}"
    sizes = (
        f"{setup.size} B"
        if setup.size == setup.reply_size
        else (f"{setup.size} B out / {setup.reply_size} B back")
    )
    server = "embedded aecho serve" if setup.embedded else setup.target
    what = f"handler {setup.handler}, framing {setup.framing}"
    if setup.offload:
        what += f", offload {setup.offload}"
    return (
        f"{server} ({what}) | {setup.connections} connections x {sizes}, {load}, "
        f"{setup.workers} worker{'s' if setup.workers > 1 else ''}"
    )


def _save(fig: Figure, path: str) -> None:
    """Raises: BenchError: the file cannot be written."""
    plt = _pyplot()
    svg = path.lower().endswith(".svg")
    try:
        # SVG keeps its text as text: selectable, searchable, smaller.
        with plt.rc_context({"svg.fonttype": "none"}):
            fig.savefig(path, format="svg" if svg else "png")
    except OSError as exc:
        raise BenchError(f"cannot write --plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


# -- one run ---------------------------------------------------------------------------------------


def write_plot(result: Result, path: str) -> None:
    """The latency spectrum beside throughput and p99 over time, parameters in the title.

    Raises:
        BenchError: the file cannot be written.
    """
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(1.1, 1))
    spectrum = fig.add_subplot(grid[:, 0])
    rate = fig.add_subplot(grid[0, 1])
    p99 = fig.add_subplot(grid[1, 1], sharex=rate)
    s = result.setup
    started = datetime.fromtimestamp(result.start_unix_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
    verified = f"{result.messages:,} replies verified" if result.messages else "no replies"
    fig.suptitle(
        f"aecho bench {s.target}: {result.msgs_per_s:,.0f} msgs/s over "
        f"{result.duration_s:.3g} s, {verified}, "
        f"{result.error_count + result.errors['mismatch']:,} errors"
        + (" (interrupted)" if result.interrupted else ""),
        fontsize=13,
        fontweight="bold",
    )
    fig.supxlabel(f"{caption(s)} | started {started} UTC", fontsize=10, color="dimgray")
    _spectrum(spectrum, result.hist)
    _rate_over_time(rate, result)
    _p99_over_time(p99, result)
    _save(fig, path)


def _spectrum(ax: Axes, h: Histogram) -> None:
    """Latency by percentile: log latency against a log 'nines' axis (x = 1/(1 - p))."""
    ax.set_title("latency by percentile")
    curve = [(p, v) for p, v in h.curve() if p < 100]
    if not h.total:
        _empty(ax, "no replies")
        return
    xs = [1 / (1 - p / 100) for p, _ in curve] or [1.0]
    ys = [max(_ms(v), 1e-3) for _, v in curve] or [max(_ms(h.max), 1e-3)]
    ax.step(xs, ys, where="post", color="black", linewidth=1.6)
    ax.set_xscale("log")
    top = 1 / (1 - min(99.99999, 100 - 100 / max(h.total, 2)) / 100)
    ticks = [q for q in NINES if 1 / (1 - q / 100) <= top * 1.0001]
    ax.set_xticks([1 / (1 - q / 100) for q in ticks], [f"{q:g}%" for q in ticks])
    ax.set_xlim(1, max(top, 2 * 1.05))
    ax.xaxis.set_minor_locator(_no_ticks())
    ax.set_xlabel("percentile (the nines: each step right is ten times rarer)")
    # The bottom 1 % would stretch the axis down for a sliver of the curve at its left end.
    _latency_axis(ax, max(_ms(h.percentile(1)), 1e-3), max([*ys, _ms(h.max)]), log=True)
    ax.set_ylabel("latency (log scale)")
    for q, name in MARKED:
        if 1 / (1 - q / 100) > top * 1.0001:
            continue
        x, y = 1 / (1 - q / 100), max(_ms(h.percentile(q)), 1e-3)
        ax.plot([x], [y], "o", color=COLORS[name], markersize=8, zorder=3)
        # Below and to the right of a rising curve there is room for the label.
        ax.annotate(
            f"{name} {_fmt_ms(y)}",
            (x, y),
            textcoords="offset points",
            xytext=(8, -16),
            ha="left",
            fontsize=11,
            color=COLORS[name],
            fontweight="bold",
        )
    ax.axhline(_ms(h.max), color="gray", linestyle=":", linewidth=1)
    ax.annotate(
        f"max {_fmt_ms(_ms(h.max))}",
        (1, _ms(h.max)),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=9,
        color="gray",
    )


def _latency_axis(ax: Axes, low_ms: float, high_ms: float, log: bool) -> None:
    """Latency on the y axis in readable units; log scale with 1-2-5 ticks when asked
    (a spread of ten times or more), else linear from 0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    if log:
        ax.set_yscale("log")  # first: it brings a locator and formatter of its own
        ax.set_ylim(low_ms / 1.3, high_ms * 1.3)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(3, 4, 6, 7, 8, 9)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    else:
        ax.set_ylim(0, high_ms * 1.15)
        ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_ms(v) if v > 0 else "0"))
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", axis="y", alpha=0.2)


def _no_ticks() -> Any:
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _rate_over_time(ax: Axes, result: Result) -> None:
    ax.set_title("throughput over time")
    if not any(result.timeline):
        _empty(ax, "no replies" if result.timeline else "no time measured")
        return
    tick = TICK_NS / 1e9
    xs = [(i + 0.5) * tick for i in range(len(result.timeline))]
    ax.plot(xs, [n / tick for n in result.timeline], color=COLORS["rate"], alpha=0.35,
            linewidth=1, label=f"per {tick * 1e3:g} ms")  # fmt: skip
    per = int(SECOND_NS // TICK_NS)
    seconds = [result.timeline[i : i + per] for i in range(0, len(result.timeline), per)]
    if len(seconds) > 1:
        # A last, partial second is shown at the rate of the time it covers.
        centres = [i + len(chunk) * tick / 2 for i, chunk in enumerate(seconds)]
        rates = [sum(chunk) / (len(chunk) * tick) for chunk in seconds]
        ax.plot(centres, rates, "o-", color=COLORS["rate"], linewidth=2, label="per second")
    if result.setup.rate:
        ax.axhline(result.setup.rate, color="black", linestyle="--", linewidth=1.2,
                   label=f"target {result.setup.rate:,.0f}/s")  # fmt: skip
    ax.set_ylim(0, max(1.0, *(n / tick for n in result.timeline), result.setup.rate or 0) * 1.1)
    ax.set_ylabel("msgs/s")
    ax.grid(True, alpha=0.5)
    ax.legend(loc="best", fontsize=9)
    ax.yaxis.set_major_formatter(_thousands())
    ax.tick_params(labelbottom=False)


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def _p99_over_time(ax: Axes, result: Result) -> None:
    ax.set_title("p99 latency per second")
    values = result.p99_by_second()
    points = [(i + 0.5, _ms(v)) for i, v in enumerate(values) if v is not None]
    if not points:
        _empty(ax, "no replies")
        return
    last = len(values)
    span = result.duration_s or last
    # The last second may be partial; its point goes in the middle of what it covers.
    points = [(min(x, (last - 1 + span) / 2) if x > last - 1 else x, y) for x, y in points]
    ys = [max(y, 1e-3) for _, y in points]
    ax.plot([x for x, _ in points], ys, "o-", color=COLORS["p99"], linewidth=2)
    _latency_axis(ax, min(ys), max(ys), log=max(ys) >= 10 * min(ys))
    ax.set_ylabel("p99")
    ax.set_xlabel("seconds since the measurement started")
    ax.set_xlim(0, max(span, 0.5))


# -- a search --------------------------------------------------------------------------------------


def write_search_plot(search: Search, path: str) -> None:
    """p50, p99 and p99.9 of every step that ran its course against its achieved
    throughput (the hockey stick), steps stopped early at their target rate, the goal as a
    line and the answer marked.

    Raises:
        BenchError: the file cannot be written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 7), layout="constrained")
    s = search.setup
    fig.suptitle(
        f"aecho bench {s.target}: latency against throughput, goal p99 <= "
        f"{_fmt_ms(search.goal_ms)}",
        fontsize=13,
        fontweight="bold",
    )
    fig.supxlabel(caption(s), fontsize=10, color="dimgray")
    measured = [st for st in search.steps if st.rate is not None and st.result.hist.total]
    if not measured:
        _empty(ax, "no step measured any reply")
        _save(fig, path)
        return
    # A step stopped early completed only part of its load: its achieved rate says
    # nothing, so it stands at the rate it was asked for.
    ran = sorted((st for st in measured if not st.result.aborted), key=_achieved)
    stopped = [st for st in measured if st.result.aborted]
    for q, name in MARKED:
        ys = [_latency(st, q) for st in ran]
        ax.plot([_achieved(st) for st in ran], ys, "-", color=COLORS[name], linewidth=1.5,
                alpha=0.8, label=name)  # fmt: skip
        for st, y in zip(ran, ys, strict=True):
            ax.plot([_achieved(st)], [y], "o" if st.passed else "x", color=COLORS[name],
                    markersize=7)  # fmt: skip
    if stopped:
        ax.plot([st.rate for st in stopped], [_latency(st, 99) for st in stopped], "v",
                color="gray", markersize=8, linestyle="none",
                label="p99 so far of a step stopped early (at its target rate)")  # fmt: skip
    ax.axhline(search.goal_ms, color="black", linestyle="--", linewidth=1.3,
               label=f"goal: p99 <= {_fmt_ms(search.goal_ms)}")  # fmt: skip
    xs = [_achieved(st) for st in ran] + [st.rate or 0.0 for st in stopped]
    best = search.best
    if best is not None:
        bx, by = _achieved(best), _latency(best, 99)
        ax.axvline(bx, color="tab:green", linestyle=":", linewidth=1.5)
        ax.plot([bx], [by], "*", color="tab:green", markersize=18, zorder=4)
        # Above the goal and beside the blade (left of it, unless that is too narrow):
        # no passing step ever lands there.
        left = bx >= 0.35 * max(xs) * 1.08
        ax.annotate(
            f"max sustainable rate\n{best.rate:,.0f} msgs/s (p99 {_fmt_ms(by)})",
            (bx, by),
            xytext=(bx * (0.97 if left else 1.03), search.goal_ms * 1.6),
            ha="right" if left else "left",
            fontsize=12,
            fontweight="bold",
            color="tab:green",
            arrowprops={"arrowstyle": "->", "color": "tab:green"},
        )
    every = [_latency(st, q) for st in measured for q, _ in MARKED]
    top = max([*every, search.goal_ms * 2.5])  # room above the goal for the answer
    _latency_axis(ax, min([*every, search.goal_ms]), top, log=True)
    ax.set_xlabel("achieved throughput (msgs/s); o passed, x failed")
    ax.set_ylabel("latency (log scale)")
    ax.xaxis.set_major_formatter(_thousands())
    ax.set_xlim(0, max(xs) * 1.08)
    ax.legend(loc="lower right", fontsize=9)  # where a hockey stick never goes
    _save(fig, path)


def _achieved(step: Step) -> float:
    return step.result.msgs_per_s


def _latency(step: Step, q: float) -> float:
    return max(_ms(step.result.hist.percentile(q)), 1e-3)
