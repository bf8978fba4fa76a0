"""What one worker keeps over time: replies per timeline tick and latencies per second,
sampled from its histogram while the window is open and closed off when it ends."""

from __future__ import annotations

from aecho.bench.connection import Tally
from aecho.bench.results import SECOND_NS, TICK_NS, slot_count
from aecho.config import BenchConfig


class Timeline(Tally):
    """A Tally with the window's timeline (see Worker)."""

    def __init__(self, cfg: BenchConfig) -> None:
        super().__init__(cfg)
        # Replies completed in each TICK_NS slot of the window, and the latencies recorded
        # in each second (sparse bucket counts), sampled by _tick from the histogram.
        self.timeline: list[int] = []
        self.booked = 0  # replies in self.timeline
        self.seconds: list[dict[int, int]] = []
        self.sampled_counts = [0] * len(self.hist.counts)

    def sample(self, now: int, merged: bool = False) -> None:
        """Sample the timeline at ``now`` while the window is open (every tick).  While
        the compiled loop holds replies, only its driver samples, as it adds them to the
        histogram (``merged``)."""
        if self.window_end_ns is None and now >= self.measure_ns and (merged or not self.held):
            self._sample(now)

    def _sample(self, now: int) -> None:
        """Put the replies counted since the last sample in the slot that just ended.

        A late wake-up books them in the last slot it spans, leaving the skipped ones at 0.
        """
        ended = (now - self.measure_ns) // TICK_NS  # slots wholly in the past
        timeline = self.timeline
        if ended > len(timeline):
            timeline.extend([0] * (ended - len(timeline)))
            total = self.hist.total
            timeline[-1] = total - self.booked
            self.booked = total
        self._sample_seconds((now - self.measure_ns) // SECOND_NS)

    def _sample_seconds(self, ended: int) -> None:
        """Close the per-second latency slots before ``ended`` (skipped ones stay empty)."""
        if ended > len(self.seconds):
            fresh = self._fresh_latencies()
            self.seconds.extend({} for _ in range(ended - len(self.seconds) - 1))
            self.seconds.append(fresh)

    def _fresh_latencies(self) -> dict[int, int]:
        """Bucket counts recorded since the last call (sparse)."""
        counts = self.hist.counts
        seen = self.sampled_counts
        fresh = {i: c - p for i, (c, p) in enumerate(zip(counts, seen, strict=True)) if c != p}
        self.sampled_counts = counts[:]
        return fresh

    def _finish_timeline(self) -> None:
        """Book the window's last replies, and every latency since the last per-second
        sample (replies drained after the window too) in the window's last second.

        The window rarely ends on a slot boundary: its last slot covers up to 1.5 slots
        rather than adding a sliver of one (plots read its true length from the duration).
        """
        assert self.window_end_ns is not None
        span = self.window_end_ns - self.measure_ns
        slots = slot_count(span, TICK_NS)
        timeline = self.timeline
        extra = sum(timeline[slots:])
        del timeline[slots:]
        timeline.extend([0] * (slots - len(timeline)))
        if slots:
            timeline[-1] += extra + self.window_messages - self.booked
        self.booked = self.window_messages
        fresh = self._fresh_latencies()
        seconds = self.seconds
        wanted = max(slot_count(span, SECOND_NS), 1 if fresh else 0)
        for extra_second in seconds[wanted:]:
            for i, n in extra_second.items():
                fresh[i] = fresh.get(i, 0) + n
        del seconds[wanted:]
        seconds.extend({} for _ in range(wanted - len(seconds)))
        if fresh:
            last = seconds[-1]
            for i, n in fresh.items():
                last[i] = last.get(i, 0) + n
