"""The ``--plot`` figure: throughput over time and the latency percentile curve."""

from __future__ import annotations

from aecho.bench import BenchError
from aecho.bench.results import Result
from aecho.bench.worker import TICK_NS


def check_plot() -> None:
    """Fail early when ``--plot`` cannot work.

    Raises:
        BenchError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'aecho[plot]'") from None


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
