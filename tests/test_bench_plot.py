"""``--plot``: PNG or SVG by the suffix, at a readable size, with what README.md promises on
it: a log latency axis with the nines, p50/p99/p99.9 marked with their values, throughput
and p99 over time with the target rate, and the run's parameters."""

from __future__ import annotations

import html
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

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


def test_unwritable_plot_is_one_line(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = serve_process()
    code, _, err = bench_cli(
        "127.0.0.1", str(server.port), "-n", "20", "--plot", str(tmp_path / "no" / "x.png")
    )
    assert code == 1
    assert err.strip().endswith("No such file or directory")
    assert "cannot write --plot" in err
