"""What a run measured: one worker's figures, their exact merge into one result (across
``--workers`` or across machines), and the ``--json`` form that carries it between them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from aecho.bench.connection import ERROR_KINDS, reply_size
from aecho.bench.errors import BenchError
from aecho.bench.histogram import SUB_BITS, Histogram
from aecho.config import BenchConfig

TICK_NS = 100_000_000  # resolution of the throughput timeline
SECOND_NS = 1_000_000_000  # resolution of latency over time


def slot_count(span_ns: int, slot_ns: int) -> int:
    """Slots of ``slot_ns`` for a window of ``span_ns``: rounded, at least one if any."""
    return max(1, (span_ns + slot_ns // 2) // slot_ns) if span_ns > 0 else 0


@dataclass(frozen=True)
class Setup:
    """What was measured: enough to label a table or a plot, and to tell whether two
    results measured the same thing."""

    target: str
    connections: int
    workers: int
    size: int  # bytes of each message sent
    reply_size: int  # bytes of each reply expected
    pipeline: int
    rate: float | None  # open loop: messages/s in total
    framing: str
    handler: str
    embedded: bool
    offload: str | None  # known for the embedded server only
    warmup_s: float
    duration_s: float | None  # as asked (-d)
    messages: int | None  # as asked (-n)
    tls: bool

    @classmethod
    def from_cfg(cls, cfg: BenchConfig) -> Setup:
        """Raises: ConfigError, HandlerError: the handler's replies cannot be predicted."""
        return cls(
            target=cfg.target,
            connections=cfg.connections,
            workers=cfg.workers,
            size=cfg.size,
            reply_size=reply_size(cfg),
            pipeline=cfg.pipeline,
            rate=cfg.rate,
            framing=cfg.framing.value,
            handler=cfg.handler,
            embedded=cfg.embedded,
            offload=cfg.offload.value if cfg.embedded else None,
            warmup_s=cfg.warmup,
            duration_s=cfg.duration,
            messages=cfg.messages,
            tls=cfg.tls,
        )

    @classmethod
    def combined(cls, setups: list[Setup], names: list[str]) -> Setup:
        """One setup for results measured side by side (loads from several machines).

        Raises:
            BenchError: two results measured different things (size, framing, handler,
                pipeline, or open against closed loop).
        """
        first = setups[0]
        for setup, name in zip(setups[1:], names[1:], strict=True):
            for what in ("size", "reply_size", "framing", "handler", "pipeline"):
                if getattr(setup, what) != getattr(first, what):
                    raise BenchError(
                        f"cannot merge {names[0]} and {name}: they measured different "
                        f"{what.replace('_', ' ')}s ({getattr(first, what)} and "
                        f"{getattr(setup, what)})"
                    )
            if (setup.rate is None) != (first.rate is None):
                raise BenchError(
                    f"cannot merge {names[0]} and {name}: one is open loop (--rate), one is not"
                )
        rates = [s.rate for s in setups]
        counts = [s.messages for s in setups]
        return replace(
            first,
            target=", ".join(dict.fromkeys(s.target for s in setups)),
            connections=sum(s.connections for s in setups),
            workers=sum(s.workers for s in setups),
            rate=None if None in rates else sum(r for r in rates if r is not None),
            embedded=all(s.embedded for s in setups),
            offload=first.offload if len({s.offload for s in setups}) == 1 else None,
            warmup_s=max(s.warmup_s for s in setups),
            duration_s=first.duration_s if len({s.duration_s for s in setups}) == 1 else None,
            messages=None if None in counts else sum(n for n in counts if n is not None),
        )


@dataclass
class WorkerResult:
    """What one worker measured (or one whole result, when merging files); picklable so
    workers can send it to the parent.  Histograms are in their sparse dict form."""

    hist: dict[str, Any]
    connect_hist: dict[str, Any]
    errors: dict[str, int]
    first_errors: dict[str, str]
    messages: int  # replies completed in the window
    bytes: int  # their bytes
    sent: int  # messages sent, in the window or not
    connected: int
    start_unix_ns: int  # wall clock at the window's start
    window_ns: int
    timeline: list[int]  # replies completed per TICK_NS of the window
    seconds: list[dict[int, int]]  # latencies recorded per second (sparse bucket counts)
    aborted: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    # The share of one core each bench process kept busy during the window (CPU time over
    # wall time; one entry per process, none for a run whose window never opened).
    cpu: list[float] = field(default_factory=list)
    # The loop that sent and verified, one entry per process: "c" (aecho.bench.engine)
    # or "python"; none in files from before bench said.
    engine: list[str] = field(default_factory=list)


@dataclass
class Result:
    setup: Setup
    hist: Histogram
    connect_hist: Histogram
    errors: dict[str, int]
    first_errors: dict[str, str]
    messages: int
    bytes: int
    sent: int
    connected: int
    start_unix_ns: int
    duration_ns: int
    timeline: list[int]
    seconds: list[dict[int, int]]
    interrupted: bool = False
    aborted: bool = False  # a search step stopped early
    server_pid: int | None = None  # the embedded server's, once stopped
    notes: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None  # why the run failed as a whole
    workers: list[WorkerResult] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # as WorkerResult.cpu, every process
    engine: list[str] = field(default_factory=list)  # as WorkerResult.engine, every process

    @property
    def busiest_cpu(self) -> float | None:
        """The largest share of a core one bench process used in the window."""
        return max(self.cpu) if self.cpu else None

    @property
    def duration_s(self) -> float:
        return self.duration_ns / 1e9

    @property
    def error_count(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind != "mismatch")

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.duration_s if self.duration_ns > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        """Reply bytes verified per second, in MiB."""
        return self.bytes / self.duration_s / (1 << 20) if self.duration_ns > 0 else 0.0

    @property
    def sent_mib_per_s(self) -> float:
        """Bytes of the messages those replies answered, per second, in MiB."""
        return self.msgs_per_s * self.setup.size / (1 << 20)

    def p99_by_second(self) -> list[int | None]:
        """p99 latency (ns) of the replies recorded in each second; None for an empty one."""
        out: list[int | None] = []
        for buckets in self.seconds:
            h = Histogram.from_counts(buckets)
            out.append(h.percentile(99) if h.total else None)
        return out

    @classmethod
    def empty(cls, setup: Setup) -> Result:
        """A result with nothing measured (a run that could not start)."""
        return cls(
            setup=setup,
            hist=Histogram(),
            connect_hist=Histogram(),
            errors=dict.fromkeys(ERROR_KINDS, 0),
            first_errors={},
            messages=0,
            bytes=0,
            sent=0,
            connected=0,
            start_unix_ns=0,
            duration_ns=0,
            timeline=[],
            seconds=[],
        )

    def as_part(self) -> WorkerResult:
        """This whole result as one part of a merge."""
        return WorkerResult(
            hist=self.hist.to_dict(),
            connect_hist=self.connect_hist.to_dict(),
            errors=dict(self.errors),
            first_errors=dict(self.first_errors),
            messages=self.messages,
            bytes=self.bytes,
            sent=self.sent,
            connected=self.connected,
            start_unix_ns=self.start_unix_ns,
            window_ns=self.duration_ns,
            timeline=list(self.timeline),
            seconds=[dict(s) for s in self.seconds],
            aborted=self.aborted,
            notes=dict(self.notes),
            cpu=list(self.cpu),
            engine=list(self.engine),
        )

    @classmethod
    def merge(cls, setup: Setup, parts: list[WorkerResult], interrupted: bool = False) -> Result:
        """Add up ``parts`` exactly: counters and histogram buckets are summed, timelines
        line up by wall clock, and the duration spans the earliest start to the latest end."""
        errors = dict.fromkeys(ERROR_KINDS, 0)
        first: dict[str, str] = {}
        notes: dict[str, Any] = {}
        timed = [p for p in parts if p.start_unix_ns] or parts  # some never got to start
        start = min(p.start_unix_ns for p in timed)
        end = max(p.start_unix_ns + p.window_ns for p in timed)
        timeline: list[int] = []
        seconds: list[dict[int, int]] = []
        for p in parts:
            for kind, n in p.errors.items():
                errors[kind] += n
            for kind, msg in p.first_errors.items():
                first.setdefault(kind, msg)
            for key, value in p.notes.items():
                if key == "server_fds" and key in notes:
                    # Each process looked at the server at its own moment: the fullest
                    # reading says whether it ran out of descriptors.
                    notes[key] = max(notes[key], value, key=lambda fds: fds[1])
                else:
                    notes.setdefault(key, value)
            if timed is not parts and not p.start_unix_ns:
                continue  # never started, while others did: no place on the timeline
            _add_at(timeline, p.timeline, round((p.start_unix_ns - start) / TICK_NS))
            shift = round((p.start_unix_ns - start) / SECOND_NS)
            seconds.extend({} for _ in range(shift + len(p.seconds) - len(seconds)))
            for i, buckets in enumerate(p.seconds):
                into = seconds[shift + i]
                for b, n in buckets.items():
                    into[b] = into.get(b, 0) + n
        return cls(
            setup=setup,
            hist=Histogram.merged(Histogram.from_dict(p.hist) for p in parts),
            connect_hist=Histogram.merged(Histogram.from_dict(p.connect_hist) for p in parts),
            errors=errors,
            first_errors=first,
            messages=sum(p.messages for p in parts),
            bytes=sum(p.bytes for p in parts),
            sent=sum(p.sent for p in parts),
            connected=sum(p.connected for p in parts),
            start_unix_ns=start,
            duration_ns=end - start,
            timeline=timeline,
            seconds=seconds,
            interrupted=interrupted,
            aborted=any(p.aborted for p in parts),
            notes=notes,
            workers=parts,
            cpu=[share for p in parts for share in p.cpu],
            engine=[name for p in parts for name in p.engine],
        )


def _add_at(into: list[int], values: list[int], shift: int) -> None:
    into.extend([0] * (shift + len(values) - len(into)))
    for i, n in enumerate(values):
        into[shift + i] += n


# -- the --json form -------------------------------------------------------------------------------


def _us(ns: float) -> float:
    return round(ns / 1e3, 3)


def latency_json(h: Histogram, keys: tuple[str, ...]) -> dict[str, float | None]:
    """Percentiles in microseconds; all null when nothing was recorded."""
    values = {
        "min": h.min,
        "mean": h.mean,
        "p50": h.percentile(50),
        "p90": h.percentile(90),
        "p99": h.percentile(99),
        "p999": h.percentile(99.9),
        "max": h.max,
    }
    return {k: _us(values[k]) if h.total else None for k in keys}


def histogram_json(h: Histogram) -> dict[str, Any]:
    return {"unit": "ns", "sub_bits": SUB_BITS, **h.to_dict()}


def server_json(s: Setup, pid: int | None) -> dict[str, Any]:
    """What bench knows of the server it measured, as ``--json`` gives it."""
    return {
        "embedded": s.embedded,
        "pid": pid,
        "handler": s.handler,
        "framing": s.framing,
        "offload": s.offload,
    }


def to_json(r: Result) -> dict[str, Any]:
    """The ``--json`` object: the keys README.md documents, what was measured, and the full
    histogram and timeline, so results from several machines can be merged exactly."""
    s = r.setup
    started = datetime.fromtimestamp(r.start_unix_ns / 1e9, UTC)
    out: dict[str, Any] = {
        "target": s.target,
        "server": server_json(s, r.server_pid),
        "connections": s.connections,
        "connected": r.connected,
        "workers": s.workers,
        "size": s.size,
        "reply_size": s.reply_size,
        "pipeline": s.pipeline,
        "rate": s.rate,
        "framing": s.framing,
        "handler": s.handler,
        "tls": s.tls,
        "warmup_s": s.warmup_s,
        "planned": {"duration_s": s.duration_s, "messages": s.messages},
        # A run that never started has no start time, not 1970.
        "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if r.start_unix_ns
        else None,
        "start_unix_ns": r.start_unix_ns,
        "duration_s": round(r.duration_s, 6),
        "duration_ns": r.duration_ns,
        "messages": r.messages,
        "sent": r.sent,
        "bytes": r.bytes,
        "msgs_per_s": round(r.msgs_per_s, 3),
        "mib_per_s": round(r.mib_per_s, 3),
        "sent_mib_per_s": round(r.sent_mib_per_s, 3),
        "errors": r.error_count,
        "mismatches": r.errors["mismatch"],
        "errors_by_kind": r.errors,
        "first_errors": r.first_errors,
        "interrupted": r.interrupted,
        "stopped_early": r.aborted,
        "latency_us": latency_json(r.hist, ("min", "mean", "p50", "p90", "p99", "p999", "max")),
        "connect_latency_us": latency_json(r.connect_hist, ("p50", "p99", "max")),
        "histogram": histogram_json(r.hist),
        "connect_histogram": histogram_json(r.connect_hist),
        "timeline": {
            "tick_s": TICK_NS / 1e9,
            "messages": r.timeline,
            "second_s": SECOND_NS / 1e9,
            "latency_buckets": r.seconds,
            "p99_us": [None if v is None else _us(v) for v in r.p99_by_second()],
        },
        "timeline_msgs_per_s": [n * 1e9 / TICK_NS for n in r.timeline],
        "diagnosis": r.notes,
        "embedded_server_pid": r.server_pid,
        "bench_cpu": r.cpu,
        "bench_engine": r.engine,
    }
    if r.failure is not None:
        out["error"] = r.failure
    return out
