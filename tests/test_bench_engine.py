"""bench's compiled loop (aecho.bench.engine): built where the tests run, the same buckets
as the histogram, and every way a connection can go wrong counted exactly as the Python
path counts it, in both loops, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aecho.bench import engine, runner
from aecho.bench.connection import ERROR_KINDS
from aecho.bench.histogram import HIGHEST_NS, SUB_BITS, bucket_index
from aecho.bench.results import Result
from aecho.config import BenchConfig
from tests.conftest import Echo, threaded_server

ENGINES = ["c", "python"]
AFTER_BYTES = 64 * 3000  # the server misbehaves once it has echoed this much: mid-run


@pytest.fixture(params=ENGINES)
def loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled loop and again with the Python one."""
    kind = str(request.param)
    monkeypatch.setenv(engine.ENGINE_ENV, kind)
    return kind


def test_the_compiled_loop_is_built_here() -> None:
    """CI builds it: a silent build failure would leave every run in Python."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the compiled loop is built on Linux only")
    assert engine.compiled() is not None


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=HIGHEST_NS))
def test_the_compiled_loop_fills_the_same_buckets(value: int) -> None:
    compiled = engine.compiled()
    if compiled is None:
        pytest.skip("not built")
    assert compiled.bucket(value, SUB_BITS) == bucket_index(value)


def cfg_for(port: int, **kw: Any) -> BenchConfig:
    base = BenchConfig(host="127.0.0.1", port=port, connections=4, duration=1.0, messages=None)
    return replace(base, **kw).validate()


class Misbehaving(Echo):
    """Echoes; once the whole server has echoed AFTER_BYTES, one connection does ``act``
    to the message in hand instead (class attributes: reset by :func:`misbehaving`)."""

    echoed = 0
    done = False
    act: Callable[[Misbehaving, bytes], None] = Echo.data_received
    silent: Misbehaving | None = None

    def data_received(self, data: bytes) -> None:
        cls = Misbehaving
        if self is cls.silent:
            return
        cls.echoed += len(data)
        if cls.echoed > AFTER_BYTES and not cls.done:
            cls.done = True
            type(self).act(self, data)
            return
        self.transport.write(data)


def corrupt(p: Misbehaving, data: bytes) -> None:
    p.transport.write(bytes([data[0] ^ 1]) + data[1:])


def extra_byte(p: Misbehaving, data: bytes) -> None:
    p.transport.write(data + b"!")


def close_between(p: Misbehaving, data: bytes) -> None:
    p.transport.close()


def close_midway(p: Misbehaving, data: bytes) -> None:
    p.transport.write(data[:10])
    p.transport.close()


def reset(p: Misbehaving, data: bytes) -> None:
    sock = p.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.transport.abort()


def fall_silent(p: Misbehaving, data: bytes) -> None:
    Misbehaving.silent = p


def misbehaving(act: Callable[[Misbehaving, bytes], None]) -> Callable[[], Misbehaving]:
    Misbehaving.echoed, Misbehaving.done, Misbehaving.silent = 0, False, None
    Misbehaving.act = act
    return Misbehaving


FAULTS = [
    (corrupt, "mismatch", "mismatch on connection"),
    (extra_byte, "mismatch", "mismatch on connection"),
    (close_between, "closed", "the server closed the connection with 1 reply owed"),
    (close_midway, "short", "the server closed the connection in the middle of a reply"),
    (reset, "reset", "connection reset: [Errno 104] Connection reset by peer"),
    (fall_silent, "timeout", "timeout on connection"),
]


def measured(port: int, **kw: Any) -> Result:
    return asyncio.run(runner.measure(cfg_for(port, **kw)))


@pytest.mark.parametrize(("act", "kind", "why"), FAULTS, ids=[f[0].__name__ for f in FAULTS])
def test_a_fault_mid_run_is_counted_as_in_python(
    loop_kind: str, act: Callable[[Misbehaving, bytes], None], kind: str, why: str
) -> None:
    """One connection goes wrong while the run sends: one error of its kind, worded the
    same in either loop, and the other connections go on to the end of the run."""
    with threaded_server(misbehaving(act)) as port:
        result = measured(port, timeout=0.3)
    assert Misbehaving.done, "the fault never happened: the run was too short"
    assert result.errors == {k: int(k == kind) for k in ERROR_KINDS}, result.first_errors
    assert result.first_errors[kind].startswith(why)
    assert result.setup.connections == 4 and result.connected == 4
    assert result.messages > AFTER_BYTES // 64
    assert sum(result.timeline) == result.messages
    assert result.engine == [loop_kind]


@pytest.mark.parametrize(("size", "pipeline"), [(64, 8), (1 << 20, 2)])
def test_pipelines_and_messages_larger_than_a_socket_buffer(
    loop_kind: str, size: int, pipeline: int
) -> None:
    """Several messages owed per connection, and messages a write cannot take at once (the
    loop waits to write the rest): every byte verified, every reply counted once."""
    with threaded_server(Echo) as port:
        result = measured(port, connections=2, size=size, pipeline=pipeline, duration=0.6)
    assert result.errors == dict.fromkeys(ERROR_KINDS, 0), result.first_errors
    assert result.engine == [loop_kind]
    assert result.messages > 4
    assert result.bytes == result.messages * size
    assert sum(result.timeline) == result.messages
    # The window closed on the replies counted in it, not before the loop's last ones.
    assert result.messages <= result.hist.total <= result.messages + 2 * pipeline
    # Every message sent was answered or still owed when the run ended.
    assert result.sent <= result.hist.total + 2 * pipeline


class InPieces(Echo):
    """Echoes each read back in pieces of 7 bytes, a write (a TCP segment) each."""

    def data_received(self, data: bytes) -> None:
        for i in range(0, len(data), 7):
            self.transport.write(data[i : i + 7])


def test_replies_that_come_in_pieces(loop_kind: str) -> None:
    with threaded_server(InPieces) as port:
        result = measured(port, connections=3, size=100, pipeline=2, duration=0.5)
    assert result.errors == dict.fromkeys(ERROR_KINDS, 0), result.first_errors
    assert result.engine == [loop_kind]
    assert result.messages > 10
    assert sum(result.timeline) == result.messages


def test_which_loop_ran_is_in_the_json() -> None:
    with threaded_server(Echo) as port:
        runs = {}
        for wanted in ("", "python"):
            env = {**os.environ, engine.ENGINE_ENV: wanted}
            out = subprocess.run(
                [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port), "-c", "4",
                 "-d", "0.3", "--workers", "2", "--json"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            runs[wanted] = json.loads(out.stdout)["bench_engine"]
    built = engine.compiled() is not None
    assert runs == {"": ["c", "c"] if built else ["python", "python"], "python": ["python"] * 2}


def test_ctrl_c_while_the_compiled_loop_sends() -> None:
    """Stopped while replies flow: the run ends at once, every reply it counted is in its
    timeline, and it exits 0 with nothing owed left unverified."""
    flowing = threading.Event()

    class Watched(Echo):
        echoed = 0

        def data_received(self, data: bytes) -> None:
            Watched.echoed += len(data)
            if Watched.echoed > AFTER_BYTES:
                flowing.set()
            self.transport.write(data)

    with threaded_server(Watched) as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aecho", "bench", "127.0.0.1", str(port), "-c", "8",
             "-d", "60", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert flowing.wait(30)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    data = json.loads(out)
    assert data["interrupted"] and data["errors"] == 0 and data["mismatches"] == 0
    assert data["messages"] > 0
    assert sum(data["timeline"]["messages"]) == data["messages"]
    # Replies recorded after the window closed: only those owed when it did.
    assert data["messages"] <= data["histogram"]["total"] <= data["messages"] + 8
    assert data["duration_s"] < 30
    assert data["bench_engine"] == (["c"] if engine.compiled() is not None else ["python"])
