"""Stopping ``aecho bench`` early: Ctrl-C once stops sending and waits for the replies still
owed; once more cuts that wait short, and the report still comes out whole, in one process
or with --workers, in a run or in --find-max-rate."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest

from aecho.bench.results import Result, Setup
from aecho.bench.search import find_max_rate
from aecho.config import BenchConfig
from tests.conftest import threaded_server
from tests.test_bench_search import model, search_cfg

WAITING = b"waiting up to"  # bench's line once a stopped run waits for replies owed
CONNECTIONS = 4


@contextmanager
def never_answering() -> Iterator[tuple[int, threading.Event]]:
    """A server that reads and never replies; yields its port and an event set once all
    CONNECTIONS connections have sent something (bench is measuring)."""
    senders: set[int] = set()
    all_sent = threading.Event()

    class Reader(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            senders.add(id(self))
            if len(senders) >= CONNECTIONS:
                all_sent.set()

    with threaded_server(Reader) as port:
        yield port, all_sent


def start_bench(port: int, *args: str) -> subprocess.Popen[bytes]:
    """``aecho bench`` against ``port`` in a process group of its own (as on a terminal,
    Ctrl-C reaches bench's spawned workers too), with a --timeout far longer than a test."""
    return subprocess.Popen(
        [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port), "-c", str(CONNECTIONS),
         "-d", "60", "--timeout", "60", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip


def read_until(proc: subprocess.Popen[bytes], token: bytes, timeout: float = 30) -> bytes:
    """What bench wrote on stderr up to the line holding ``token``."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while token not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"no {token!r} on stderr: {seen!r}"
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, f"stderr closed before {token!r}: {seen!r}"
            seen += chunk
    return seen


def finish(proc: subprocess.Popen[bytes], seen: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object bench printed, and the whole of its stderr."""
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (seen + err).decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    data = json.loads(out)  # the whole of stdout is one object
    assert isinstance(data, dict)
    return data, stderr


MODES = [
    pytest.param(workers, search, id=f"{'search' if search else 'run'}-{workers}w")
    for search in (False, True)
    for workers in (1, 2)
]


def search_args(search: bool) -> list[str]:
    # A step's wait for replies owed is 20 times the goal: 20 s here.
    return ["--find-max-rate", "--max-p99", "1000"] if search else []


@pytest.mark.parametrize(("workers", "search"), MODES)
def test_ctrl_c_again_stops_waiting_for_replies_owed(workers: int, search: bool) -> None:
    with never_answering() as (port, all_sent):
        proc = start_bench(port, "--workers", str(workers), *search_args(search))
        try:
            assert all_sent.wait(30)  # readiness: every connection has a message out
            os.killpg(proc.pid, signal.SIGINT)
            seen = read_until(proc, WAITING)  # readiness: it stopped, and waits
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            data, err = finish(proc, seen)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert took < 10, err  # not the 20 s or 60 s the replies would have been waited for
    assert proc.returncode == 1, err
    assert data["interrupted"] is True
    if search:
        assert [s["errors"] for s in data["steps"]] == [CONNECTIONS]
        return
    # The replies still owed are timeouts, at the time waited: a run that failed.
    assert data["errors_by_kind"]["timeout"] == CONNECTIONS
    assert data["messages"] == 0
    (failure,) = data["failures"]
    assert failure.startswith(f"{CONNECTIONS} timeouts: no reply when the wait was cut short")
    assert failure in err


@pytest.mark.parametrize(("workers", "search"), MODES)
def test_ctrl_c_over_and_over_costs_nothing_of_the_report(workers: int, search: bool) -> None:
    """The keys of an impatient user: Ctrl-C every 20 ms from the first on until bench has
    exited.  It stops at once, prints one JSON object, and never a traceback."""
    with never_answering() as (port, all_sent):
        proc = start_bench(port, "--workers", str(workers), *search_args(search))
        try:
            assert all_sent.wait(30)
            deadline = time.monotonic() + 10
            presses = 0
            while proc.poll() is None and time.monotonic() < deadline:
                os.killpg(proc.pid, signal.SIGINT)
                presses += 1
                time.sleep(0.02)  # the pace of the presses, not a readiness wait
            data, err = finish(proc, b"")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.poll() is not None and presses >= 2, err
    assert proc.returncode == 1, err
    assert data["interrupted"] is True


def test_sigterm_after_ctrl_c_also_stops_waiting() -> None:
    """SIGTERM stops bench as Ctrl-C does, and so cuts the wait short too."""
    with never_answering() as (port, all_sent):
        proc = start_bench(port)
        try:
            assert all_sent.wait(30)
            os.killpg(proc.pid, signal.SIGINT)
            seen = read_until(proc, WAITING)
            proc.send_signal(signal.SIGTERM)
            data, err = finish(proc, seen)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 1, err
    assert data["errors_by_kind"]["timeout"] == CONNECTIONS


def test_ctrl_c_while_the_search_settles_ends_it() -> None:
    """A Ctrl-C in the wait after a failed step (for the server to answer promptly again)
    ends the search there, as it does in a step."""
    calls: list[float | None] = []
    measure = model(1000.0, calls)
    settled = 0

    def interrupted_in_settle(cfg: BenchConfig, setup: Setup, drain_s: float, goal: int) -> Result:
        nonlocal settled
        result = measure(cfg, setup, drain_s, goal)
        if cfg.messages is not None:  # the settle's single message
            settled += 1
            result = replace(result, interrupted=True)
        return result

    cfg = search_cfg()
    search = find_max_rate(cfg, Setup.from_cfg(cfg), interrupted_in_settle)
    assert settled == 1
    assert search.interrupted
    assert calls == [None, 1000.0, 2000.0]  # the probe, one pass, the failure: no more
