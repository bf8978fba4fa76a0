"""The options of ``aecho bench`` and ``aecho bench merge``: names and help.

``cli.bench`` takes one parameter per alias here, with its default.
"""

from __future__ import annotations

from typing import Annotated

import typer

from aecho.commandline import DURATION, LOAD_WORKERS, RATE, SIZE
from aecho.config import DEFAULT_PORT, DEFAULT_SEARCH_STEP, DEFAULT_SEARCH_WARMUP, LoopKind, Offload
from aecho.config import Framing as FramingKind

Host = Annotated[
    str | None,
    typer.Argument(
        help="Server to measure (HOST, HOST:PORT or [V6]:PORT); none: start an embedded one."
    ),
]
Port = Annotated[
    int | None, typer.Argument(min=0, max=65535, help=f"Server port [default: {DEFAULT_PORT}].")
]
Connections = Annotated[
    int, typer.Option("-c", "--connections", min=1, help="Concurrent connections.")
]
Duration = Annotated[
    float,
    typer.Option(
        "-d",
        "--duration",
        help="How long to measure (unless -n); each step's, with --find-max-rate "
        f"(default {DEFAULT_SEARCH_STEP:g} s there).",
        **DURATION,
    ),
]
Messages = Annotated[
    int | None, typer.Option("-n", "--messages", help="Messages in total, then stop.")
]
Size = Annotated[int, typer.Option("-s", "--size", help="Bytes per message.", **SIZE)]
Pipeline = Annotated[
    int, typer.Option(min=1, help="Messages in flight per connection (1: ping-pong).")
]
Rate = Annotated[
    float | None,
    typer.Option(help="Open loop: total messages/s, sent on schedule; latency from it.", **RATE),
]
Warmup = Annotated[
    float,
    typer.Option(
        help="Seconds of load left out of the results; before each --find-max-rate "
        f"step, {DEFAULT_SEARCH_WARMUP:g} s unless given.",
        **DURATION,
    ),
]
ConnectRate = Annotated[
    float | None, typer.Option(help="Open connections at most this fast (per second).", **RATE)
]
Workers = Annotated[
    int,
    typer.Option(
        help="Load-generating processes, results merged exactly (auto: one per CPU, at "
        "most one per connection).",
        **LOAD_WORKERS,
    ),
]
Unix = Annotated[str | None, typer.Option(help="Measure the server on this Unix socket.")]
Timeout = Annotated[
    float, typer.Option(help="Seconds to wait for a connection or a reply.", **DURATION)
]
Framing = Annotated[
    FramingKind, typer.Option(help="raw: any bytes; line: newline-terminated messages.")
]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else.")
]
MaxP99 = Annotated[
    float | None,
    typer.Option(help="Exit 1 if p99 latency is above this many ms (the search's goal)."),
]
FindMaxRate = Annotated[
    bool,
    typer.Option(
        "--find-max-rate", help="Search open-loop rates for the highest with p99 within --max-p99."
    ),
]
MinRate = Annotated[float | None, typer.Option(help="Exit 1 if fewer messages/s than this.")]
Plot = Annotated[
    str | None,
    typer.Option(
        help="Draw the latency and throughput figure to this file (PNG or SVG by suffix)."
    ),
]
OffloadMode = Annotated[
    Offload, typer.Option(help="Embedded server: run the handler inline or in processes.")
]
Handler = Annotated[
    str, typer.Option(help="The server's handler (embedded: passed on; replies checked).")
]
Cafile = Annotated[str | None, typer.Option(help="TLS: trust the CAs in this PEM file.")]
Insecure = Annotated[bool, typer.Option(help="TLS: do not verify the server's certificate.")]
Loop = Annotated[LoopKind, typer.Option(help="Event loop implementation.")]
Results = Annotated[
    list[str],
    typer.Argument(
        metavar="RESULT.json",
        help="Files written by 'aecho bench --json', from runs made at the same time.",
    ),
]
