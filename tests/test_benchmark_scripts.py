"""The scripts in benchmarks/ still run from a clone and print their figures.

Each runs for a fraction of a second here, so only that it works end to end is checked
(its servers start and announce readiness, its loads connect, its report has figures), not
its targets: those are measured side by side at full length (benchmarks/README.md).  Exit
status 1 means a target was missed, which such short runs may well do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SHORT = ["--duration", "0.3", "--warmup", "0.1"]

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS.parent,
    )
    assert out.returncode in (0, 1), out.stdout + out.stderr  # 1: a target missed
    return out.stdout


def figure(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture(scope="module")
def compiler() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("the C reference servers and load generator need gcc")


@pytest.mark.usefixtures("compiler")
def test_bench_speed_compares_bench_with_the_c_load_generator() -> None:
    out = run_script("bench_speed.py", "--rounds", "1", "-c", "20", *SHORT)
    m = re.search(
        r"median: loadgen ([\d,]+) msgs/s, aecho bench ([\d,]+) msgs/s, ratio ([\d.]+)", out
    )
    assert m is not None, out
    assert figure(m[1]) > 0 and figure(m[2]) > 0 and float(m[3]) > 0


@pytest.mark.usefixtures("compiler")
def test_core_bench_compares_aecho_with_the_references() -> None:
    out = run_script("core_bench.py", "--reps", "1", "--loads", "64B", *SHORT)
    m = re.search(r"\| 500 x 64 B \| ([\d.]+)x", out)
    assert m is not None, out
    assert float(m[1]) > 0


@pytest.mark.usefixtures("compiler")
def test_offload_bench_compares_process_with_inline() -> None:
    out = run_script("offload_bench.py", "--reps", "1", "--case", "echo", *SHORT)
    m = re.search(r"median inline ([\d,]+) msgs/s, process ([\d,]+) msgs/s: ratio ([\d.]+)", out)
    assert m is not None, out
    assert figure(m[1]) > 0 and figure(m[2]) > 0


def test_pool_alone_moves_tasks() -> None:
    out = run_script("pool_alone.py", "--seconds", "0.3")
    m = re.search(r"batches of 16 +([\d,]+) msgs/s", out)
    assert m is not None, out
    assert figure(m[1]) > 0
