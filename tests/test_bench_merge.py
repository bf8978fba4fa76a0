"""``--json`` carries a whole result, and ``aecho bench merge`` adds results up exactly: the
same figures ``--workers`` reports for the same data."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aecho.bench import runner
from aecho.bench.reading import from_json
from aecho.bench.results import Result, Setup, to_json
from aecho.config import BenchConfig, Framing
from tests.conftest import ServerProcess, bench_cli

# What a merge must reproduce exactly (the rest names the run: target, start time, ...).
MERGED = (
    "connections", "workers", "rate", "size", "reply_size", "connected", "start_unix_ns",
    "duration_ns", "duration_s", "messages", "sent", "bytes", "msgs_per_s", "mib_per_s",
    "sent_mib_per_s", "errors", "mismatches", "errors_by_kind", "latency_us",
    "connect_latency_us", "histogram", "connect_histogram", "timeline", "timeline_msgs_per_s",
    "bench_cpu", "bench_engine",
)  # fmt: skip


def write(path: Path, result: Result) -> str:
    path.write_text(json.dumps(to_json(result)))
    return str(path)


def elsewhere(result: Result) -> Result:
    """The same figures as measured by another machine: it started a nanosecond later
    (merge refuses one run given twice)."""
    return replace(result, start_unix_ns=result.start_unix_ns + 1)


@pytest.fixture(scope="module")
def two_workers() -> Any:
    """A --workers 2 open-loop run against a real server, kept for the tests below."""
    server = ServerProcess(["--port", "0"])
    try:
        cfg = BenchConfig(
            host="127.0.0.1", port=server.port, connections=6, duration=1.5, rate=3000, workers=2
        ).validate()
        yield cfg, runner.run(cfg)
    finally:
        server.kill()


def test_json_round_trip_is_exact(two_workers: tuple[BenchConfig, Result]) -> None:
    _, result = two_workers
    data = to_json(result)
    assert to_json(from_json(json.loads(json.dumps(data)))) == data
    h = data["histogram"]
    assert h["unit"] == "ns" and h["total"] == result.hist.total
    assert len(h["counts"]) == sum(1 for n in result.hist.counts if n)  # sparse
    per_second = data["timeline"]["latency_buckets"]
    assert sum(sum(s.values()) for s in per_second) == h["total"]


def test_merging_files_equals_the_workers_merge(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    """Each worker's part written as if by a machine of its own, then merged: the figures
    --workers 2 reported, to the nanosecond and the bucket."""
    cfg, result = two_workers
    plans = runner.plans(cfg)
    files = []
    for plan, part in zip(plans, result.workers, strict=True):
        setup = replace(result.setup, connections=plan.connections, workers=1, rate=plan.rate)
        files.append(write(tmp_path / f"part{plan.index}.json", Result.merge(setup, [part])))
    code, out, err = bench_cli("merge", *files, "--json")
    assert code == 0, err
    merged, direct = json.loads(out), json.loads(json.dumps(to_json(result)))
    assert {k: merged[k] for k in MERGED} == {k: direct[k] for k in MERGED}
    assert merged["messages"] > 0
    png = tmp_path / "merged.png"
    code, table, err = bench_cli("merge", *files, "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "6/6 connections" in table and "2 workers" in table
    assert f"{result.messages:,} (every byte verified)" in table


def test_runs_started_together_on_two_machines(
    serve_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The README recipe: start the runs at the same time, then merge their --json."""
    server = serve_process()
    args = ["127.0.0.1", str(server.port), "-c", "3", "-d", "1", "--json"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "aecho", "bench", *args], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    files = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        (tmp_path / f"m{i}.json").write_text(out)
        files.append(str(tmp_path / f"m{i}.json"))
    runs = [json.loads(Path(f).read_text()) for f in files]
    code, out, _ = bench_cli("merge", *files, "--json")
    assert code == 0
    merged = json.loads(out)
    assert merged["messages"] == sum(r["messages"] for r in runs)
    assert merged["histogram"]["total"] == sum(r["histogram"]["total"] for r in runs)
    assert merged["connections"] == 6
    assert merged["target"] == f"127.0.0.1:{server.port}"
    starts = [r["start_unix_ns"] for r in runs]
    assert merged["duration_ns"] == max(
        s + r["duration_ns"] for s, r in zip(starts, runs, strict=True)
    ) - min(starts)
    assert merged["latency_us"]["p99"] >= min(r["latency_us"]["p99"] for r in runs)
    assert merged["latency_us"]["max"] == max(r["latency_us"]["max"] for r in runs)


def test_files_from_before_bench_measured_its_cpu_still_merge(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    """A file written before ``bench_cpu`` existed merges; the busy share stays unknown
    for it, and the other file's shares are kept."""
    _, result = two_workers
    old = to_json(elsewhere(result))
    del old["bench_cpu"], old["bench_engine"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    new = write(tmp_path / "new.json", result)
    code, out, err = bench_cli("merge", str(tmp_path / "old.json"), new, "--json")
    assert code == 0, err
    merged = json.loads(out)
    assert merged["bench_cpu"] == result.cpu and len(result.cpu) == 2
    assert merged["bench_engine"] == result.engine and len(result.engine) == 2
    assert merged["messages"] == 2 * result.messages


@pytest.mark.parametrize("share", [float("nan"), -0.5, None])
def test_a_file_with_an_impossible_bench_cpu_is_refused(
    share: float | None, two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    _, result = two_workers
    data = to_json(result)
    data["bench_cpu"] = [share]
    (tmp_path / "odd.json").write_text(json.dumps(data))
    code, _, err = bench_cli("merge", str(tmp_path / "odd.json"))
    assert code == 1 and "not an 'aecho bench --json' result" in err, err


def test_a_file_naming_an_unknown_loop_is_refused(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    _, result = two_workers
    data = to_json(result)
    data["bench_engine"] = ["rust"]
    (tmp_path / "odd.json").write_text(json.dumps(data))
    code, _, err = bench_cli("merge", str(tmp_path / "odd.json"))
    assert code == 1 and "not an 'aecho bench --json' result" in err, err


def test_merge_refuses_what_does_not_add_up(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    _, result = two_workers
    one = write(tmp_path / "a.json", result)
    other = replace(
        elsewhere(result),
        setup=replace(result.setup, size=64, reply_size=64),
        bytes=result.messages * 64,
    )
    code, out, err = bench_cli("merge", one, write(tmp_path / "b.json", other))
    assert code == 1 and out == ""
    assert "cannot merge" in err and "sizes (1024 and 64)" in err
    closed = replace(elsewhere(result), setup=replace(result.setup, rate=None))
    code, _, err = bench_cli("merge", one, write(tmp_path / "c.json", closed))
    assert code == 1
    assert "open loop" in err
    (tmp_path / "search.json").write_text(json.dumps({"max_rate": 5, "steps": []}))
    code, _, err = bench_cli("merge", one, str(tmp_path / "search.json"))
    assert code == 1
    assert "--find-max-rate result" in err
    (tmp_path / "junk.json").write_text("[1, 2]")
    code, _, err = bench_cli("merge", str(tmp_path / "junk.json"))
    assert code == 1
    assert err.count("\n") == 1 and "not an 'aecho bench --json' result" in err
    code, _, err = bench_cli("merge")
    assert code == 2
    assert err.startswith("aecho: error:") and err.count("\n") == 1
    assert "aecho bench merge --help" in err


def test_merge_reports_errors_in_its_exit_status(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    _, result = two_workers
    errors = dict(result.errors, timeout=2)
    failed = replace(
        elsewhere(result), errors=errors, first_errors={"timeout": "no reply within 10s"}
    )
    code, _, err = bench_cli("merge", write(tmp_path / "ok.json", result),
                             write(tmp_path / "bad.json", failed))  # fmt: skip
    assert code == 1
    assert "2 timeouts" in err


def test_setup_names_only_what_was_asked() -> None:
    setup = Setup.from_cfg(BenchConfig(handler="sha256", framing=Framing.line).validate())
    assert (setup.size, setup.reply_size, setup.embedded, setup.offload) == (
        1024,
        65,
        True,
        "inline",
    )


def _edit(data: dict[str, Any], where: str, value: Any) -> None:
    *path, last = where.split(".")
    for key in path:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("histogram.counts", {"3808": 1}),  # one past the last bucket
        ("histogram.counts", {"-1": 1}),  # would count from the end of the list
        ("histogram.counts", {"5": -1}),
        ("timeline.latency_buckets", [{"99999": 1}]),
        ("timeline.messages", [1.5]),
        ("diagnosis", {"server_fds": [1]}),
        ("diagnosis", [1]),
        ("server.offload", ["inline"]),
        ("start_unix_ns", 1e30),
        ("start_unix_ns", -5),
        ("duration_ns", float("inf")),
        ("messages", -1),
        ("errors_by_kind.timeout", True),
        ("rate", float("nan")),
        ("warmup_s", -1),
        ("interrupted", "no"),
        ("error", 7),
        ("messages", 10**400),  # no float holds it: the rate could not be computed
        ("messages", "5"),
        ("bytes", True),
        ("target", 5),
        ("errors_by_kind.timeout", 2),  # and no first_errors["timeout"] to name it
        ("diagnosis", {"server_fds": [1, 2, 1.5]}),
        ("warmup_s", "0.5"),
        ("target", "\ud800"),  # a lone surrogate: JSON allows it, no terminal prints it
        ("handler", "echo\nsecond line"),  # a refusal naming it would be two lines
        ("first_errors", {"timeout": "one\ntwo"}),
    ],
)
def test_a_hand_edited_file_is_refused_in_one_line(
    where: str, value: Any, two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    """Every value is checked as it is read, so none can fail the merge half-way (with a
    traceback) or send it into a huge allocation."""
    _, result = two_workers
    good = write(tmp_path / "good.json", result)
    data = json.loads(json.dumps(to_json(result)))  # a copy: it shares the result's dicts
    _edit(data, where, value)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    for extra in ((), ("--json",)):
        code, out, err = bench_cli("merge", good, str(tmp_path / "bad.json"), *extra)
        assert code == 1 and out == "", (where, out)
        assert err.count("\n") == 1, err
        assert "is not an 'aecho bench --json' result" in err, err


def _more_replies_than_sent(data: dict[str, Any]) -> None:
    data["messages"] = 3 * data["sent"]
    data["timeline"]["messages"][0] += data["messages"] - sum(data["timeline"]["messages"])


DISAGREEMENTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "more replies than sent": _more_replies_than_sent,
    "messages not the timeline's": lambda d: d.update(messages=d["messages"] // 2),
    "timeline scaled": lambda d: d["timeline"].update(
        messages=[5 * n for n in d["timeline"]["messages"]]
    ),
    "duration cut to a quarter": lambda d: d.update(duration_ns=d["duration_ns"] // 4),
    "bytes scaled": lambda d: d.update(bytes=10 * d["bytes"]),
    "histogram short of the replies": lambda d: d["histogram"].update(counts={}, total=0),
}


@pytest.mark.parametrize("edit", list(DISAGREEMENTS))
def test_a_file_whose_figures_disagree_is_refused(
    edit: str, two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    """Edits that keep every value plausible on its own but no run could have measured:
    replies are at most the messages sent, the timeline adds up to them over the run's
    length, the histogram holds them, and an echo's bytes are its replies' size."""
    _, result = two_workers
    data = json.loads(json.dumps(to_json(result)))
    DISAGREEMENTS[edit](data)
    (tmp_path / "edited.json").write_text(json.dumps(data))
    code, out, err = bench_cli("merge", str(tmp_path / "edited.json"), "--json")
    assert code == 1 and out == "", out
    assert err.count("\n") == 1 and "is not an 'aecho bench --json' result" in err, err


def test_one_run_given_twice_is_refused(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    _, result = two_workers
    one = write(tmp_path / "a.json", result)
    again = write(tmp_path / "copy.json", result)
    for files in ((one, one), (one, again)):
        code, out, err = bench_cli("merge", *files)
        assert code == 1 and out == "", out
        assert err.count("\n") == 1 and "are the same run: give each run once" in err, err


def test_a_huge_file_one_nested_too_deeply_or_runs_weeks_apart_are_refused_in_one_line(
    two_workers: tuple[BenchConfig, Result], tmp_path: Path
) -> None:
    _, result = two_workers
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(300 << 20)  # sparse: /dev/zero, say, is not a result either
    code, _, err = bench_cli("merge", str(huge))
    assert code == 1 and err.count("\n") == 1 and "is over 256 MiB" in err, err
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = bench_cli("merge", str(tmp_path / "deep.json"))
    assert code == 1 and err.count("\n") == 1 and "nested too deeply" in err, err
    later = replace(result, start_unix_ns=result.start_unix_ns + 30 * 86_400 * 10**9)
    code, out, err = bench_cli(
        "merge", write(tmp_path / "a.json", result), write(tmp_path / "b.json", later)
    )
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "span 30.0 days" in err and "merge runs that ran at the same time" in err, err


def test_the_fullest_look_at_the_servers_descriptors_wins_the_merge(
    two_workers: tuple[BenchConfig, Result],
) -> None:
    """Each process of --workers looks at the server at its own moment; one that looked
    after the others had closed their connections must not hide that it ran out."""
    _, result = two_workers
    part = Result.empty(result.setup).as_part()
    late = replace(part, notes={"server_fds": [7, 274, 1024]})
    full = replace(part, notes={"server_fds": [7, 1020, 1024]})
    for order in ([late, full], [full, late]):
        merged = Result.merge(result.setup, order)
        assert merged.notes["server_fds"] == [7, 1020, 1024]
