"""Memory under peers that never read: 10 connections send as fast as they can for 10 s
and never read, in every mode, while a probe connection echoes once every 20 ms.

    .venv/bin/python benchmarks/memory_bound.py [--seconds 10] [--modes raw-inline,...]
        [--src OTHER/src]

Reported per mode: the serving process's peak RSS growth over its RSS before the flood
(sampled every 50 ms), the probe's p50 / p99 / max latency, and what the flooders got
into the kernel.  Targets (README.md): growth < 64 MiB, probe p99 < 50 ms.  ``--src``
runs the server from another source tree (an older checkout, for a before/after).  The
modes and the flood itself are the ones tests/test_memory_bounds.py runs for 4 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess, flood  # noqa: E402
from tests.test_memory_bounds import MODES  # noqa: E402

GROWTH_TARGET_MIB = 64
P99_TARGET_MS = 50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--src", help="serve from this source tree instead")
    args = parser.parse_args()
    env = {"PYTHONPATH": os.path.abspath(args.src)} if args.src else None
    print(f"10 peers that never read, {args.seconds:g} s; probe every 20 ms\n")
    print("| mode | RSS growth MiB | probe p50 ms | probe p99 ms | probe max ms | sent MiB | ok |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    failed = 0
    for mode in args.modes.split(","):
        options, chunk, probe, reply = MODES[mode]
        server = ServerProcess(["--port", "0", *options], env=env)
        try:
            result = flood(server.pid, server.port, chunk, probe, reply, args.seconds)
        finally:
            server.kill()
        lat = result.probe_ms or [float("inf")]
        ok = (
            result.growth_mib < GROWTH_TARGET_MIB
            and result.probe_p99_ms < P99_TARGET_MS
            and not result.probe_failures
        )
        failed += not ok
        note = "yes" if ok else f"NO ({result.probe_failures} probe failures)"
        print(
            f"| {mode} | {result.growth_mib:.1f} | {statistics.median(lat):.2f} "
            f"| {result.probe_p99_ms:.1f} | {max(lat):.1f} | {result.sent / 2**20:.0f} | {note} |",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
