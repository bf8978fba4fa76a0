"""Showing what bench measured: live progress, the results table, JSON and a plot."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aecho.bench.engine import TICK_NS, BenchError, Result
from aecho.config import BenchConfig
from aecho.text import needs

ERROR_LABELS = {
    "connect": "connect failures",
    "refused": "closed before any reply",
    "closed": "closed by server",
    "short": "short replies (closed mid-reply)",
    "reset": "resets",
    "timeout": "timeouts",
    "mismatch": "mismatches",
}


def fmt_ns(ns: float) -> str:
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.3f} s"


class Progress:
    """A one-line live display on stderr: elapsed of total, msgs/s now, p99 so far, errors."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.console = Console(stderr=True)
        self.live = Live(
            Text("connecting ..."), console=self.console, auto_refresh=False, transient=True
        )
        self.live.start()
        self._last: tuple[float, int] | None = None

    def update(self, p: dict[str, Any]) -> None:
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (p["messages"] - self._last[1]) / (now - self._last[0])
        self._last = (now, p["messages"])
        if p["warming"]:
            head = "warming up"
        elif self.cfg.duration is not None:
            head = f"{p['elapsed_s']:5.1f} / {self.cfg.duration:g} s"
        else:
            head = f"{p['messages']:,} / {self.cfg.messages:,} msgs"
        line = Text.assemble(
            (head, "bold"),
            f"   {rate:>12,.0f} msgs/s   p99 {fmt_ns(p['p99_ns'])}   ",
            (f"errors {p['errors']}", "red" if p["errors"] else "green"),
        )
        self.live.update(line, refresh=True)

    def stop(self) -> None:
        self.live.stop()


def as_json(result: Result) -> dict[str, Any]:
    """The ``--json`` object (keys fixed by DESIGN.md, plus details)."""
    cfg, h, ch = result.cfg, result.hist, result.connect_hist

    def us(ns: float) -> float:
        return round(ns / 1e3, 3)

    return {
        "target": cfg.target,
        "connections": cfg.connections,
        "connected": result.connected,
        "workers": cfg.workers,
        "size": cfg.size,
        "pipeline": cfg.pipeline,
        "rate": cfg.rate,
        "framing": cfg.framing.value,
        "warmup_s": cfg.warmup,
        "duration_s": round(result.duration_s, 6),
        "messages": result.messages,
        "bytes": result.bytes,
        "msgs_per_s": round(result.msgs_per_s, 3),
        "mib_per_s": round(result.mib_per_s, 3),
        "errors": result.error_count,
        "mismatches": result.errors["mismatch"],
        "errors_by_kind": result.errors,
        "interrupted": result.interrupted,
        "latency_us": {
            "min": us(h.min),
            "mean": us(h.mean),
            "p50": us(h.percentile(50)),
            "p90": us(h.percentile(90)),
            "p99": us(h.percentile(99)),
            "p999": us(h.percentile(99.9)),
            "max": us(h.max),
        },
        "connect_latency_us": {
            "p50": us(ch.percentile(50)),
            "p99": us(ch.percentile(99)),
            "max": us(ch.max),
        },
        "timeline_msgs_per_s": [n * 1e9 / TICK_NS for n in result.timeline],
        "embedded_server_pid": result.server_pid,
    }


def print_json(result: Result) -> None:
    sys.stdout.write(json.dumps(as_json(result)) + "\n")
    sys.stdout.flush()


def print_table(result: Result, console: Console | None = None) -> None:
    console = console or Console()
    cfg, h = result.cfg, result.hist
    table = Table(title=f"aecho bench {cfg.target}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    mode = f"rate {cfg.rate:,.0f}/s" if cfg.rate else f"pipeline {cfg.pipeline}"
    table.add_row(
        "load",
        f"{result.connected}/{cfg.connections} connections, {cfg.size} B, {mode}, "
        f"{cfg.workers} worker{'s' if cfg.workers > 1 else ''}",
    )
    dur = f"{result.duration_s:.3f} s" + (" (interrupted)" if result.interrupted else "")
    table.add_row("duration", dur)
    table.add_row("messages", f"{result.messages:,} (every byte verified)")
    table.add_row("throughput", f"{result.msgs_per_s:,.0f} msgs/s   {result.mib_per_s:,.2f} MiB/s")
    for label, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        table.add_row(f"latency {label}", fmt_ns(h.percentile(q)))
    table.add_row("latency max", fmt_ns(h.max))
    table.add_row("connect p99", fmt_ns(result.connect_hist.percentile(99)))
    for kind, n in result.errors.items():
        if n:
            table.add_row(Text(ERROR_LABELS[kind], style="red"), Text(f"{n:,}", style="red"))
    if not any(result.errors.values()):
        table.add_row("errors", Text("none", style="green"))
    console.print(table)


def check_plot() -> None:
    """Fail early when ``--plot`` cannot work.

    Raises:
        BenchError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(needs("--plot", "matplotlib", "plot")) from None


def write_plot(result: Result, path: str) -> None:
    """Throughput over time and the latency percentile curve, in one PNG.

    Raises:
        BenchError: the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7))
    step = TICK_NS / 1e9
    top.plot([i * step for i in range(len(result.timeline))], [n / step for n in result.timeline])
    top.set_xlabel("time (s)")
    top.set_ylabel("messages/s")
    top.set_ylim(bottom=0)
    top.set_title(f"aecho bench {result.cfg.target}: throughput")
    curve = [(p, v) for p, v in result.hist.curve() if p < 100]
    if curve:
        # x = 1/(1 - p): the usual way to give the tail (p99, p99.9, ...) room.
        bottom.plot([1 / (1 - p / 100) for p, _ in curve], [v / 1e6 for _, v in curve])
        bottom.set_xscale("log")
        ticks = [
            q
            for q in (50, 90, 99, 99.9, 99.99, 99.999)
            if 1 / (1 - q / 100) <= 2 * len(curve) * 1e3
        ]
        bottom.set_xticks([1 / (1 - q / 100) for q in ticks], [f"{q:g}%" for q in ticks])
    bottom.set_xlabel("percentile")
    bottom.set_ylabel("latency (ms)")
    bottom.set_title("latency by percentile")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise BenchError(f"cannot write --plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)


def verdict(result: Result) -> list[str]:
    """One line per reason the run failed (empty: success)."""
    cfg, errs = result.cfg, result.errors
    out: list[str] = []
    if errs["refused"]:
        out.append(
            f"the server closed {errs['refused']} of {cfg.connections} connections before "
            "replying: its connection limit was probably reached (aecho serve --max-connections)"
        )
    if errs["connect"]:
        out.append(f"{errs['connect']} connections failed: {result.first_errors['connect']}")
    if errs["mismatch"]:
        out.append(f"{errs['mismatch']} replies did not match what was sent")
    for kind in ("closed", "short", "reset", "timeout"):
        if errs[kind]:
            out.append(f"{errs[kind]} {ERROR_LABELS[kind]}: {result.first_errors[kind]}")
    if cfg.max_p99_ms is not None:
        p99 = result.hist.percentile(99) / 1e6
        if p99 > cfg.max_p99_ms or not result.messages:
            out.append(f"p99 latency {p99:.3f} ms is above --max-p99 {cfg.max_p99_ms:g} ms")
    if cfg.min_rate is not None and result.msgs_per_s < cfg.min_rate:
        out.append(
            f"throughput {result.msgs_per_s:,.0f} msgs/s is below --min-rate {cfg.min_rate:,.0f}"
        )
    return out
