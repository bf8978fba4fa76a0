"""``--plot``: PNG or SVG by the suffix, at a readable size, with what README.md promises on
it: a log latency axis with the nines, p50/p99/p99.9 marked with their values, throughput
and p99 over time with the target rate, and the run's parameters."""

from __future__ import annotations

import html
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from aecho.bench import plot, report
from aecho.bench.errors import BenchError
from aecho.bench.results import Result, Setup
from aecho.bench.search import Search
from aecho.config import BenchConfig
from tests.conftest import ServerProcess, Silent, bench_cli, threaded_server

pytest.importorskip("matplotlib")


def svg_text(path: Path) -> str:
    """The text drawn in an SVG written with its fonts as text."""
    svg = path.read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    return html.unescape(" ".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg)))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_png_of_a_run(serve_process: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = serve_process()
    png = tmp_path / "run.png"
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "-d", "1", "-c", "2", "--json", "--plot", str(png)
    )
    assert code == 0, err
    assert png_size(png) == (1200, 750)  # the default size is the readable one


def test_svg_of_an_open_loop_run(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = serve_process()
    svg = tmp_path / "run.svg"
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "--rate", "2000", "-d", "2.2", "-c", "4", "-s", "64",
        "--plot", str(svg),
    )  # fmt: skip
    assert code == 0, err
    text = svg_text(svg)
    assert f"aecho bench 127.0.0.1:{server.port}" in text
    for marked in ("p50", "p99", "p99.9"):
        assert re.search(rf"{re.escape(marked)} [\d.]+ (us|ms)", text), marked
    for nines in ("50%", "90%", "99%", "99.9%"):
        assert nines in text
    assert re.search(r"\d+ (us|ms)", text)  # the latency axis speaks in units
    assert "target 2,000/s" in text  # open loop: the rate asked for, drawn
    assert "throughput over time" in text and "p99 latency per second" in text
    caption = "4 connections x 64 B, rate 2,000/s, 1 worker"
    assert caption in text and "handler echo, framing raw" in text


def test_a_plot_of_nothing_says_so(tmp_path: Path) -> None:
    svg = tmp_path / "none.svg"
    with threaded_server(Silent) as port:
        code, _, _ = bench_cli(
            "127.0.0.1", str(port), "-c", "2", "-d", "0.3", "--timeout", "0.5", "--plot", str(svg)
        )
    assert code == 1
    text = svg_text(svg)
    assert "no replies" in text
    assert "replies verified" not in text


def test_search_plot(serve_process: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = serve_process("--handler", "burn", "--framing", "line")
    svg = tmp_path / "knee.svg"
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "--framing", "line", "-s", "64", "-c", "10",
        "--find-max-rate", "--max-p99", "50", "-d", "0.5", "--warmup", "0.2", "--plot", str(svg),
    )  # fmt: skip
    assert code == 0, err
    text = svg_text(svg)
    assert "latency against throughput" in text
    assert "goal: p99 <= 50 ms" in text
    assert re.search(r"max sustainable rate [\d,]+ msgs/s \(p99 [\d.]+ ms\)", text), text
    # The handle of the hockey stick: steps at a quarter to three quarters of the answer.
    assert len(re.findall(r"step [\d,]+: .*: pass", err)) >= 4


def test_unwritable_plot_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    """A --plot file that cannot be written is a usage error, found before the run (no
    server is started or driven) and said in one line; --json prints nothing then."""
    for path, why in (
        (tmp_path / "no" / "x.png", "no such directory"),
        (tmp_path, "name a .png or .svg file"),
        (tmp_path / "dir.svg", "it is a directory"),
    ):
        if path.name == "dir.svg":
            path.mkdir()
        for command in (["-n", "20", "--json"], ["merge", "nothing.json"]):
            code, out, err = bench_cli(*command, "--plot", str(path))
            assert code == 2, err
            assert out == ""
            assert len(err.strip().splitlines()) == 1 and why in err, err


@pytest.mark.parametrize("search", [False, True], ids=["run", "search"])
def test_a_plot_that_fails_after_the_run_is_one_failure_more(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], search: bool
) -> None:
    """The disk fills while the run measures: --json still prints one object, which says
    why, and the exit status is 1."""

    def broken(_: object, path: str) -> None:
        raise BenchError(f"cannot write --plot {path}: No space left on device")

    monkeypatch.setattr(plot, "write_plot", broken)
    monkeypatch.setattr(plot, "write_search_plot", broken)
    cfg = BenchConfig(
        host="127.0.0.1", port=7, duration=1.0, json=True, plot="x.png",
        find_max_rate=search, max_p99_ms=5.0 if search else None,
    ).validate()  # fmt: skip
    setup = Setup.from_cfg(cfg)
    if search:
        code = report.show_search(Search(setup, goal_ms=5.0), cfg)
    else:
        code = report.show(Result.empty(setup), cfg)
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert len(lines) == 1
    data = json.loads(lines[0])
    said = data["error"] if search else data["failures"][-1]
    assert said == "cannot write --plot x.png: No space left on device"
