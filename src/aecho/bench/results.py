"""What a run measured: one worker's figures, and their exact merge into one result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aecho.bench.connection import ERROR_KINDS
from aecho.bench.histogram import Histogram
from aecho.config import BenchConfig


@dataclass
class WorkerResult:
    """What one worker measured; picklable so workers can send it to the parent."""

    hist: dict[str, Any]
    connect_hist: dict[str, Any]
    errors: dict[str, int]
    first_errors: dict[str, str]
    messages: int
    bytes: int
    sent: int
    connected: int
    measure_ns: int
    end_ns: int
    timeline: list[int]


@dataclass
class Result:
    cfg: BenchConfig
    hist: Histogram
    connect_hist: Histogram
    errors: dict[str, int]
    first_errors: dict[str, str]
    messages: int
    bytes: int
    connected: int
    duration_s: float
    timeline: list[int]
    interrupted: bool = False
    server_pid: int | None = None  # the embedded server's, once stopped
    workers: list[WorkerResult] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind != "mismatch")

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.duration_s / (1 << 20) if self.duration_s > 0 else 0.0

    @classmethod
    def merge(
        cls, cfg: BenchConfig, parts: list[WorkerResult], interrupted: bool = False
    ) -> Result:
        errors = dict.fromkeys(ERROR_KINDS, 0)
        first: dict[str, str] = {}
        timeline: list[int] = []
        for p in parts:
            for kind, n in p.errors.items():
                errors[kind] += n
            for kind, msg in p.first_errors.items():
                first.setdefault(kind, msg)
            timeline.extend([0] * (len(p.timeline) - len(timeline)))
            for i, n in enumerate(p.timeline):
                timeline[i] += n
        start = min(p.measure_ns for p in parts)
        end = max(p.end_ns for p in parts)
        return cls(
            cfg=cfg,
            hist=Histogram.merged(Histogram.from_dict(p.hist) for p in parts),
            connect_hist=Histogram.merged(Histogram.from_dict(p.connect_hist) for p in parts),
            errors=errors,
            first_errors=first,
            messages=sum(p.messages for p in parts),
            bytes=sum(p.bytes for p in parts),
            connected=sum(p.connected for p in parts),
            duration_s=max(0, end - start) / 1e9,
            timeline=timeline,
            interrupted=interrupted,
            workers=parts,
        )
