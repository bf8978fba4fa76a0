"""Offload benchmark: ``--offload process`` side by side with inline, on the same load.

    .venv/bin/python benchmarks/offload_bench.py [--reps 3] [--duration 5] [--json out.json]
        [--baseline OTHER/src]

Two comparisons, 500 connections of 64-byte ping-pong from the C load generator
(benchmarks/loadgen.c, raw bytes, so raw framing applies):

- ``echo``: ``--offload process --handler echo`` against inline echo.  Inline echo is
  the server's fastest path; the process figure shows what batching leaves of the
  per-task IPC cost.  Target: at least 50% of inline.
- ``burn``: ``--handler burn`` (about 1 ms of CPU per message) with ``--offload process
  --pool-size 2`` against inline.  Target: at least 1.7x inline on a 2-core machine.

For every repetition the two servers take turns, each freshly started, so slow drifts
in the machine's background load hit both alike.  Reported: the median msgs/s of each
over the repetitions, and the ratio of the medians.  Nothing is pinned: the workers
need every core.  ``--baseline`` adds a third server to every repetition, the process
mode served from another source tree (a before/after in one run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import aecho_serve, cpu_seconds, median, run_loadgen, server_process, settle

CONNECTIONS = 500
SIZE = 64

CASES: dict[str, dict[str, Any]] = {
    "echo": {
        "inline": ["--handler", "echo"],
        "process": ["--offload", "process", "--handler", "echo"],
        "target": 0.7,
    },
    "burn": {
        "inline": ["--handler", "burn"],
        "process": ["--offload", "process", "--pool-size", "2", "--handler", "burn"],
        "target": 1.7,
    },
}


def family(root: int) -> list[int]:
    """``root`` and every process below it (the server and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [root], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def family_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def measure(
    args: list[str], duration: float, warmup: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    with server_process(aecho_serve(*args), env=env) as (proc, port):
        pids = family(proc.pid)
        cpu0, t0 = family_cpu(pids), time.monotonic()
        result = run_loadgen(port, CONNECTIONS, SIZE, duration, warmup=warmup)
        # CPU the server and its workers got: on a shared machine this, not the
        # code, can be what caps the burn figures.
        result["server_cores"] = (family_cpu(pids) - cpu0) / (time.monotonic() - t0)
    settle()
    if result.get("errors") or result.get("mismatches"):
        raise RuntimeError(f"load generator saw errors against {args}: {result}")
    return result


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median taken)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--baseline", type=Path, help="also run the process mode from this source tree"
    )
    opts = parser.parse_args()
    modes: dict[str, dict[str, str] | None] = {"inline": None, "process": None}
    if opts.baseline:
        modes["baseline"] = {"PYTHONPATH": str(opts.baseline.resolve())}

    report: dict[str, Any] = {"loadavg_before": loadavg()}
    ok = True
    print(f"load average before: {report['loadavg_before']} on {os.cpu_count()} CPUs", flush=True)
    for name in opts.case or list(CASES):
        case = CASES[name]
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        for rep in range(opts.reps):
            for mode, env in modes.items():
                args = case["inline" if mode == "inline" else "process"]
                result = measure(args, opts.duration, opts.warmup, env)
                runs[mode].append(float(result["msgs_per_s"]))
                p99 = result["latency_us"]["p99"]
                print(
                    f"{name:5} rep {rep + 1}/{opts.reps} {mode:8} "
                    f"{result['msgs_per_s']:>10.0f} msgs/s  p99 {p99:.0f} us  "
                    f"server+workers used {result['server_cores']:.2f} cores",
                    flush=True,
                )
        inline, process = median(runs["inline"]), median(runs["process"])
        ratio = process / inline if inline else 0.0
        passed = ratio >= case["target"]
        ok = ok and passed
        report[name] = {
            "inline_msgs_per_s": runs["inline"],
            "process_msgs_per_s": runs["process"],
            "median_inline": inline,
            "median_process": process,
            "ratio": ratio,
            "target": case["target"],
        }
        print(
            f"{name:5} median inline {inline:.0f} msgs/s, process {process:.0f} msgs/s: "
            f"ratio {ratio:.2f} (target >= {case['target']}) {'ok' if passed else 'MISSED'}",
            flush=True,
        )
        if "baseline" in runs:
            baseline = median(runs["baseline"])
            report[name].update(baseline_msgs_per_s=runs["baseline"], median_baseline=baseline)
            print(
                f"{name:5} median baseline {baseline:.0f} msgs/s: ratio to inline "
                f"{baseline / inline if inline else 0.0:.2f}, process/baseline "
                f"{process / baseline if baseline else 0.0:.2f}",
                flush=True,
            )
    report["loadavg_after"] = loadavg()
    print(f"load average after: {report['loadavg_after']}", flush=True)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
