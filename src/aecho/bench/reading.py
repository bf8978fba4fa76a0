"""``aecho bench merge``: ``--json`` results read back and added up.  Every value is
checked as it is read: a hand-edited or corrupt file is refused in one line, and a merge
never meets a value that would fail it, or send it into a huge allocation, half-way."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from aecho.bench.connection import ERROR_KINDS
from aecho.bench.errors import BenchError
from aecho.bench.histogram import SUB_BITS, Histogram, checked_bucket, natural
from aecho.bench.results import TICK_NS, Result, Setup, slot_count

T = TypeVar("T")


def from_json(data: dict[str, Any]) -> Result:
    """The result a ``--json`` object describes.

    Raises:
        KeyError, TypeError, ValueError, AttributeError, OverflowError: ``data`` is not
            such an object, or holds a value no run can have.
    """
    if data["histogram"].get("sub_bits") != SUB_BITS:
        raise ValueError("its histogram has other buckets than this version's")
    server, planned, timeline = data["server"], data["planned"], data["timeline"]
    setup = Setup(
        target=_text(data["target"]),
        connections=natural(data["connections"]),
        workers=natural(data["workers"]),
        size=natural(data["size"]),
        reply_size=natural(data["reply_size"]),
        pipeline=natural(data["pipeline"]),
        rate=_optional(_positive, data["rate"]),
        framing=_text(data["framing"]),
        handler=_text(data["handler"]),
        embedded=_flag(server["embedded"]),
        offload=_optional(_text, server["offload"]),
        warmup_s=_seconds(data["warmup_s"]),
        duration_s=_optional(_seconds, planned["duration_s"]),
        messages=_optional(natural, planned["messages"]),
        tls=_flag(data["tls"]),
    )
    errors = {kind: natural(data["errors_by_kind"][kind]) for kind in ERROR_KINDS}
    first_errors = {_text(k): _text(v) for k, v in data["first_errors"].items()}
    for kind, count in errors.items():
        if count and kind not in first_errors:  # the verdict names the first of each kind
            raise ValueError(f"{count} {kind} errors, and not the first of them")
    return _consistent(
        Result(
            setup=setup,
            hist=Histogram.from_dict(data["histogram"]),
            connect_hist=Histogram.from_dict(data["connect_histogram"]),
            errors=errors,
            first_errors=first_errors,
            messages=natural(data["messages"]),
            bytes=natural(data["bytes"]),
            sent=natural(data["sent"]),
            connected=natural(data["connected"]),
            start_unix_ns=_clock(data["start_unix_ns"]),
            duration_ns=_clock(data["duration_ns"]),
            timeline=[natural(n) for n in timeline["messages"]],
            seconds=[
                {checked_bucket(i): natural(n) for i, n in s.items()}
                for s in timeline["latency_buckets"]
            ],
            interrupted=_flag(data["interrupted"]),
            aborted=_flag(data["stopped_early"]),
            server_pid=_optional(natural, data["embedded_server_pid"]),
            notes=_notes(data["diagnosis"]),
            failure=_optional(_text, data.get("error")),
            # Files from before bench measured its own CPU have none: still merged.
            cpu=[_share(share) for share in data.get("bench_cpu", [])],
            engine=[_engine_name(name) for name in data.get("bench_engine", [])],
        )
    )


def _consistent(r: Result) -> Result:
    """``r`` if its figures agree with each other as a run's (or a merge's) always do.

    Raises:
        ValueError: they do not: the file was edited.
    """
    if r.messages > r.sent:
        raise ValueError(f"{r.messages} replies to {r.sent} messages sent")
    if sum(r.timeline) != r.messages:
        raise ValueError(f"a timeline of {sum(r.timeline)} replies for {r.messages}")
    if r.hist.total < r.messages:
        raise ValueError(f"a histogram of {r.hist.total} replies for {r.messages}")
    # Timelines merged by wall clock round each start to a slot: one more or less.
    if abs(len(r.timeline) - slot_count(r.duration_ns, TICK_NS)) > 1:
        raise ValueError(f"a timeline of {len(r.timeline)} slots for {r.duration_ns} ns")
    if r.setup.handler in SIZED and r.bytes != r.messages * r.setup.reply_size:
        raise ValueError(f"{r.bytes} bytes in {r.messages} replies of {r.setup.reply_size}")
    return r


# Handlers whose every reply to bench's payloads is reply_size bytes long (one of one's
# own may answer each message with another size).
SIZED = frozenset({"echo", "burn", "upper", "reverse", "sha256"})


CLOCK_LIMIT_NS = 1 << 62  # past the year 2116, and past any duration


def _optional(read: Callable[[Any], T], value: Any) -> T | None:
    return None if value is None else read(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not true or false")
    return value


def _text(value: Any) -> str:
    """A string to print: one line, no control characters, encodable (no lone surrogates)."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    if not value.isprintable():
        raise ValueError(f"{value!r} is not printable text")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _seconds(value: Any) -> float:
    seconds = _number(value)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{value!r} is not a number of seconds")
    return seconds


def _positive(value: Any) -> float:
    number = _number(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{value!r} is not a positive number")
    return number


def _clock(value: Any) -> int:
    ns = natural(value)
    if ns >= CLOCK_LIMIT_NS:
        raise ValueError(f"{value!r} ns is out of range")
    return ns


def _notes(value: Any) -> dict[str, Any]:
    """The diagnosis (see Worker._diagnose): only what report.verdict can read."""
    if not isinstance(value, dict):
        raise TypeError(f"diagnosis {value!r} is not an object")
    notes: dict[str, Any] = {}
    if "server_fds" in value:
        fds = value["server_fds"]
        if not isinstance(fds, list) or len(fds) != 3:
            raise ValueError(f"server_fds {fds!r} is not [pid, open, limit]")
        pid, count = natural(fds[0]), natural(fds[1])
        limit = -1 if fds[2] == -1 and type(fds[2]) is int else natural(fds[2])  # -1: none
        notes["server_fds"] = [pid, count, limit]
    if "tls" in value:
        notes["tls"] = _flag(value["tls"])
    return notes


def _share(value: Any) -> float:
    """A share of a core read from a file.

    Raises:
        ValueError, TypeError: not a finite number at or above 0.
    """
    share = _number(value)
    if not math.isfinite(share) or share < 0:
        raise ValueError(f"bench_cpu {value!r}")
    return share


def _engine_name(value: Any) -> str:
    """Which loop a process ran, read from a file: "c" or "python".

    Raises:
        ValueError: neither.
    """
    if value not in ("c", "python"):
        raise ValueError(f"bench_engine {value!r}")
    return str(value)


# A week-long run's --json is a few tens of MiB (its timeline is most of it).
MAX_FILE_BYTES = 256 << 20


def load(path: str) -> Result:
    """Read a file written from ``aecho bench --json``.

    Raises:
        BenchError: it cannot be read or is not such a file (one-line reason).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # /dev/zero is a file too
        if len(raw) > MAX_FILE_BYTES:
            raise BenchError(f"{path} is over {MAX_FILE_BYTES >> 20} MiB: not a bench result")
        data = json.loads(raw)
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BenchError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise BenchError(f"{path} is not a bench result: nested too deeply") from None
    if isinstance(data, dict) and "max_rate" in data:
        raise BenchError(f"{path} is a --find-max-rate result: merge the results of plain runs")
    try:
        return from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise BenchError(
            f"{path} is not an 'aecho bench --json' result of this version ({exc!r} is wrong)"
        ) from None


# Merged timelines line up by wall clock: runs far apart would make one mostly of zeros.
MAX_MERGE_SPAN_NS = 7 * 86_400 * 1_000_000_000


def merge_main(paths: list[str], as_json: bool, plot_path: str | None = None) -> int:
    """``aecho bench merge``: print the combined result of ``--json`` files; 1 if it holds
    errors, or its plot could not be written.

    Raises:
        BenchError: a file cannot be read, the files measured different things, or
            matplotlib is missing.
        aecho.config.ConfigError: the plot's file cannot be written.
    """
    import aecho.bench.plot as plot
    import aecho.bench.report as report

    if plot_path:
        plot.check_plot(plot_path)
    results = [load(path) for path in paths]
    seen: dict[tuple[int, int, str], str] = {}
    for path, r in zip(paths, results, strict=True):
        # Two machines do not start at the same nanosecond: one run given twice would
        # count its load twice.
        run = (r.start_unix_ns, r.duration_ns, r.setup.target)
        if r.start_unix_ns and run in seen:
            raise BenchError(f"{seen[run]} and {path} are the same run: give each run once")
        seen.setdefault(run, path)
    timed = [r for r in results if r.start_unix_ns]
    if timed:
        span = max(r.start_unix_ns + r.duration_ns for r in timed) - min(
            r.start_unix_ns for r in timed
        )
        if span > MAX_MERGE_SPAN_NS:
            raise BenchError(
                f"these runs span {span / 86_400e9:.1f} days, so their timeline would too: "
                "merge runs that ran at the same time"
            )
    setup = Setup.combined([r.setup for r in results], paths)
    merged = Result.merge(setup, [r.as_part() for r in results])
    merged.interrupted = any(r.interrupted for r in results)
    failures = report.verdict(merged)
    return report.present(
        merged, failures, as_json=as_json, plot=plot_path, prefix="aecho bench merge"
    )
