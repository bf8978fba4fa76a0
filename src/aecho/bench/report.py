"""Showing what bench measured: the live line, the results table, the search table, the
``--json`` output, and the verdict (why a run counts as failed)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aecho.bench.errors import BenchError
from aecho.bench.histogram import format_ns
from aecho.bench.results import Result, Setup, to_json
from aecho.bench.search import Search, Step
from aecho.bench.search import to_json as search_json
from aecho.bench.stopping import waiting_note
from aecho.config import BenchConfig

ERROR_LABELS = {
    "connect": "connect failures",
    "refused": "closed before any reply",
    "closed": "closed by server",
    "short": "short replies (closed mid-reply)",
    "reset": "resets",
    "timeout": "timeouts",
    "mismatch": "mismatches",
}
USUAL_FD_LIMITS = (256, 1024, 4096)  # common soft RLIMIT_NOFILE values
BUSY_SHARE = 0.9  # a bench process this busy may be what limited the measurement


class Progress:
    """A one-line live display on stderr: elapsed of total, msgs/s now, p99 so far, errors."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.console = Console(stderr=True)
        self.live = Live(
            Text("connecting ..."), console=self.console, auto_refresh=False, transient=True
        )
        self.live.start()

    def update(self, p: dict[str, Any]) -> None:
        errors = (f"errors {p['errors']}", "red" if p["errors"] else "green")
        if p["warming"]:
            # Nothing is counted while warming up: a rate of 0 would be a false figure.
            line = Text.assemble(
                ("warming up", "bold"), f"   {p['warmup_left_s']:.1f} s left   ", errors
            )
        else:
            if self.cfg.duration is not None:
                head = f"{p['elapsed_s']:5.1f} / {self.cfg.duration:g} s"
            else:
                head = f"{p['messages']:,} / {self.cfg.messages:,} msgs"
            rate = "" if p["rate"] is None else f"{p['rate']:>12,.0f} msgs/s   "
            line = Text.assemble(
                (head, "bold"), f"   {rate}p99 {format_ns(p['p99_ns'])}   ", errors
            )
        self.live.update(line, refresh=True)

    def note(self, drain_s: float) -> None:
        """A stopped run waits for the replies still owed: a line above the live one."""
        self.console.print(f"aecho bench: {waiting_note(drain_s)}", markup=False, highlight=False)

    def stop(self) -> None:
        self.live.stop()


# -- one run ---------------------------------------------------------------------------------------


def describe_server(setup: Setup, pid: int | None) -> tuple[str, str]:
    """The server measured, and what bench knows of what it runs: (server, handler)."""
    if setup.embedded:
        where = "embedded aecho serve" + (f" (pid {pid})" if pid is not None else "")
        return where, f"{setup.handler}, framing {setup.framing}, offload {setup.offload}"
    return setup.target, f"{setup.handler}, framing {setup.framing} (as bench checks replies)"


def print_table(result: Result, console: Console | None = None) -> None:
    console = console or Console()
    s, h = result.setup, result.hist
    table = Table(title=f"aecho bench {s.target}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    server, handler = describe_server(s, result.server_pid)
    table.add_row("server", server)
    table.add_row("handler", handler)
    mode = f"rate {s.rate:,.0f}/s" if s.rate else f"pipeline {s.pipeline}"
    sizes = f"{s.size} B" if s.reply_size == s.size else f"{s.size} B out, {s.reply_size} B back"
    table.add_row(
        "load",
        f"{result.connected}/{s.connections} connections, {sizes}, {mode}, "
        f"{s.workers} worker{'s' if s.workers > 1 else ''}",
    )
    dur = f"{result.duration_s:.3f} s" + (" (interrupted)" if result.interrupted else "")
    table.add_row("duration", dur)
    verified = " (every byte verified)" if result.messages and not result.errors["mismatch"] else ""
    table.add_row("messages", f"{result.messages:,}{verified}")
    if s.reply_size == s.size:
        volume = f"{result.mib_per_s:,.2f} MiB/s each way"
    else:
        volume = f"{result.sent_mib_per_s:,.2f} MiB/s out, {result.mib_per_s:,.2f} MiB/s back"
    table.add_row("throughput", f"{result.msgs_per_s:,.0f} msgs/s   {volume}")
    for label, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        table.add_row(f"latency {label}", format_ns(h.percentile(q)) if h.total else "-")
    table.add_row("latency max", format_ns(h.max) if h.total else "-")
    ch = result.connect_hist
    table.add_row("connect p99", format_ns(ch.percentile(99)) if ch.total else "-")
    if result.cpu:
        shares = ", ".join(f"{share:.0%}" for share in result.cpu)
        busy = (result.busiest_cpu or 0.0) >= BUSY_SHARE
        table.add_row(
            "bench cpu",
            Text(
                f"{shares} of a core{' each' if len(result.cpu) > 1 else ''}",
                style="yellow" if busy else "",
            ),
        )
    for kind, n in result.errors.items():
        if n:
            table.add_row(Text(ERROR_LABELS[kind], style="red"), Text(f"{n:,}", style="red"))
    if not any(result.errors.values()):
        table.add_row("errors", Text("none", style="green"))
    console.print(table)


def busy_note(result: Result, name: str = "bench") -> str | None:
    """A warning when a bench process kept (almost) its whole core busy in the window:
    then it, not the server, may be what limited the rate (and added to the latency)."""
    busiest = result.busiest_cpu
    if busiest is None or busiest < BUSY_SHARE:
        return None
    n = len(result.cpu)
    who = name if n == 1 else f"the busiest of {n} {name} processes"
    return (
        f"{who} kept {busiest:.0%} of a core busy: the load generator may be what limited "
        "this measurement, not the server; spread the load with --workers or over more "
        "machines (aecho bench merge)"
    )


def print_json(result: Result, failures: list[str] | None = None) -> None:
    data = to_json(result)
    data["failures"] = verdict(result) if failures is None else failures
    note = busy_note(result)
    data["warnings"] = [] if note is None else [note]
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def print_failure_json(setup: Setup, exc: BenchError) -> None:
    """``--json`` when nothing could be measured: the usual object, zeros and the reason."""
    result = exc.partial if isinstance(exc.partial, Result) else Result.empty(setup)
    result.failure = str(exc)
    print_json(result, [str(exc)])


def print_search_failure_json(setup: Setup, cfg: BenchConfig, exc: BenchError) -> None:
    """``--find-max-rate --json`` when the search could not run: its object, no steps."""
    data = search_json(Search(setup, goal_ms=cfg.max_p99_ms or 0.0))
    data["error"] = str(exc)
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def show(result: Result, cfg: BenchConfig) -> int:
    """Print the result as asked (table or JSON, plot) and the verdict; the exit status.

    Raises:
        BenchError: the plot cannot be written.
    """
    failures = verdict(result, cfg.max_p99_ms, cfg.min_rate)
    return present(result, failures, as_json=cfg.json, plot=cfg.plot, prefix="aecho bench")


def present(
    result: Result, failures: list[str], *, as_json: bool, plot: str | None, prefix: str
) -> int:
    """The plot, the table or the JSON object, then warnings and failures on stderr, each
    line after ``prefix``; the exit status (1: the run failed, or its plot could not be
    written: one failure more, and ``--json`` still prints one object).
    """
    if plot:
        from aecho.bench.plot import write_plot

        try:
            write_plot(result, plot)
        except BenchError as exc:
            failures = [*failures, str(exc)]
    if as_json:
        print_json(result, failures)
    else:
        print_table(result)
    print_notes(result, prefix)
    for line in failures:
        print(f"{prefix}: {line}", file=sys.stderr)
    return 1 if failures else 0


def print_notes(result: Result, prefix: str) -> None:
    """What does not fail the run but may make its figures wrong, on stderr."""
    note = busy_note(result)
    if note is not None:
        print(f"{prefix}: warning: {note}", file=sys.stderr)


def verdict(
    result: Result, max_p99_ms: float | None = None, min_rate: float | None = None
) -> list[str]:
    """One line per reason the run failed (empty: success)."""
    s, errs, notes = result.setup, result.errors, result.notes
    out: list[str] = []
    if notes.get("tls"):
        # Everything else (closed connections, garbage replies) follows from this.
        return [f"the server at {s.target} speaks TLS and dropped every plain connection: "
                "did you mean --tls?"]  # fmt: skip
    fds = notes.get("server_fds")
    out_of_fds = fds is not None and fds[2] > 0 and fds[1] >= fds[2] - max(8, fds[2] // 50)
    if errs["refused"]:
        out.append(_refused(result, fds, out_of_fds))
    if errs["connect"]:
        out.append(f"{errs['connect']} connections failed: {result.first_errors['connect']}")
    if errs["mismatch"]:
        out.append(f"{errs['mismatch']} replies did not match what was sent")
    for kind in ("closed", "short", "reset", "timeout"):
        if errs[kind]:
            why = result.first_errors[kind]
            if kind == "timeout" and fds is not None and out_of_fds:
                why = f"{why}: too few file descriptors: {_fds_text(fds)}"
            out.append(f"{errs[kind]} {ERROR_LABELS[kind]}: {why}")
    if not result.messages and not out:
        out.append(
            "nothing was measured: interrupted before a reply completed in the measured window"
            if result.interrupted
            else "nothing was measured: no reply completed in the measured window "
            "(give a longer -d?)"
        )
        return out  # the goals below cannot be judged: that one line says why
    if max_p99_ms is not None:
        p99 = result.hist.percentile(99) / 1e6
        if p99 > max_p99_ms or not result.hist.total:
            shown = f"{p99:.3f} ms" if result.hist.total else "unknown (no replies)"
            out.append(f"p99 latency {shown} is above --max-p99 {max_p99_ms:g} ms")
    if min_rate is not None and result.msgs_per_s < min_rate:
        out.append(
            f"throughput {result.msgs_per_s:,.0f} msgs/s is below --min-rate {min_rate:,.0f}"
        )
    return out


def _fds_text(fds: list[int]) -> str:
    pid, used, limit = fds
    return (
        f"the server (pid {pid}) has {used} of its {limit} open; raise its limit "
        "(ulimit -n, LimitNOFILE=) or use fewer connections"
    )


def _refused(result: Result, fds: list[int] | None, out_of_fds: bool) -> str:
    """Name why the server closed connections before replying: its descriptors or its
    connection limit."""
    n, total = result.errors["refused"], result.setup.connections
    head = f"the server closed {n} of {total} connections before replying"
    if fds is not None and out_of_fds:
        return f"{head}: too few file descriptors: {_fds_text(fds)}"
    if fds is not None:
        return (
            f"{head}: connection limit reached (the server, pid {fds[0]}, has {fds[1]} of "
            f"{fds[2]} file descriptors open, so not its descriptor limit); raise "
            "aecho serve --max-connections or use fewer connections"
        )
    served = result.connected - n
    for limit in USUAL_FD_LIMITS:
        if limit - 64 <= served < limit:
            return (
                f"{head}: probably too few file descriptors: it served {served}, just under "
                f"the usual limit of {limit}; raise the server's ulimit -n (LimitNOFILE=)"
            )
    return f"{head}: connection limit reached (aecho serve --max-connections)"


# -- the search ------------------------------------------------------------------------------------


def print_step(step: Step) -> None:
    """One line on stderr as each search step ends."""
    r = step.result
    p99 = format_ns(r.hist.percentile(99)) if r.hist.total else "-"
    verdict_word = "probe" if step.rate is None else ("pass" if step.passed else "fail")
    early = " (stopped early)" if r.aborted else ""
    print(
        f"aecho bench: step {step.label}: {r.msgs_per_s:,.0f} msgs/s, p99 {p99}, "
        f"errors {r.error_count + r.errors['mismatch']}: {verdict_word}{early}",
        file=sys.stderr,
        flush=True,
    )


def print_search_table(search: Search, console: Console | None = None) -> None:
    console = console or Console()
    s = search.setup
    table = Table(
        title=f"aecho bench {s.target}: the highest rate with p99 <= {search.goal_ms:g} ms",
        caption=f"{s.connections} connections, {s.size} B; the probe runs closed loop; "
        "stopped: failed, ended once it could no longer pass",
        title_justify="left",
        caption_justify="left",
    )
    for name in ("target/s", "achieved/s", "p50", "p99", "p99.9", "errors", "result"):
        table.add_column(name, justify="right", no_wrap=True)
    for st in search.steps:
        r, h = st.result, st.result.hist
        cells = [format_ns(h.percentile(q)) if h.total else "-" for q in (50, 99, 99.9)]
        if st.rate is None:
            target, outcome = "probe", Text("-")
        elif st.passed:
            target, outcome = f"{st.rate:,.0f}", Text("pass", style="green")
        else:
            word = "stopped" if r.aborted else "fail"
            target, outcome = f"{st.rate:,.0f}", Text(word, style="red")
        errors = r.error_count + r.errors["mismatch"]
        table.add_row(target, f"{r.msgs_per_s:,.0f}", *cells, f"{errors:,}", outcome)
    console.print(table)
    console.print(answer_line(search))


def answer_line(search: Search) -> str:
    best = search.best
    if best is None:
        return f"no rate held p99 within {search.goal_ms:g} ms"
    p99 = format_ns(best.result.hist.percentile(99))
    return f"max sustainable rate: {best.rate:,.0f} msgs/s (p99 {p99} at {best.rate:,.0f})"


def show_search(search: Search, cfg: BenchConfig) -> int:
    """Print the search as asked (plot, table or JSON); the exit status (1: no rate passed,
    or the plot could not be written: ``--json`` then says so in its ``error``)."""
    failure = None
    if cfg.plot:
        from aecho.bench.plot import write_search_plot

        try:
            write_search_plot(search, cfg.plot)
        except BenchError as exc:
            failure = str(exc)
    if cfg.json:
        data = search_json(search)
        if failure is not None:
            data["error"] = failure
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()
    else:
        print_search_table(search)
    busy = [st for st in search.steps if (st.result.busiest_cpu or 0.0) >= BUSY_SHARE]
    if busy:
        # The lowest rate asked for (a step stopped early may have achieved next to none).
        first = min(busy, key=lambda st: st.result.msgs_per_s if st.rate is None else st.rate)
        rate = "" if first.rate is None else " msgs/s"
        print(
            f"aecho bench: warning: at step {first.label}{rate}, {busy_note(first.result)}",
            file=sys.stderr,
        )
    if failure is not None:
        print(f"aecho bench: {failure}", file=sys.stderr)
    if search.best is None:
        print(f"aecho bench: {answer_line(search)}", file=sys.stderr)
        return 1
    return 0 if failure is None else 1
