"""The options of ``aecho serve``: names, help, and the panel of ``serve --help`` each sits in.

``cli.serve`` takes one parameter per alias here, with its default; the panels appear
in ``--help`` in the order their first option appears in that signature.
"""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from aecho.commandline import DURATION, SIZE, WORKERS
from aecho.config import Framing, LoopKind, Offload, ProxyMode
from aecho.process.logs import LogLevel

listening = functools.partial(typer.Option, rich_help_panel="Listening")
messages = functools.partial(typer.Option, rich_help_panel="Messages and offload")
connections = functools.partial(typer.Option, rich_help_panel="Connections")
observe = functools.partial(typer.Option, rich_help_panel="Logs and metrics")
daemon = functools.partial(typer.Option, rich_help_panel="Daemon")
tls_proxy = functools.partial(typer.Option, rich_help_panel="TLS and PROXY protocol")
processes = functools.partial(typer.Option, rich_help_panel="Processes")

# -- listening
Host = Annotated[
    str, listening("-H", "--host", metavar="HOST", help="Address or name to listen on.")
]
Port = Annotated[
    int,
    listening(
        "-p", "--port", min=0, max=65535, metavar="PORT", help="TCP port; 0: any free one (logged)."
    ),
]
Unix = Annotated[
    str | None, listening(metavar="PATH", help="Listen on this Unix socket instead of TCP.")
]
UnixMode = Annotated[
    str, listening(metavar="MODE", help="Octal permissions of the --unix socket file.")
]
Loop = Annotated[LoopKind, listening(help="Event loop implementation.")]
Backlog = Annotated[
    int, listening(min=1, metavar="N", help="Listen backlog (capped by net.core.somaxconn).")
]
Udp = Annotated[bool, listening("--udp", help="Also echo UDP datagrams on the same port.")]

# -- messages and offload
OffloadMode = Annotated[
    Offload, messages(help="Run the handler on the loop or in worker processes.")
]
PoolSize = Annotated[
    int | None,
    messages(min=1, metavar="N", show_default="CPU count", help="Worker processes (offload)."),
]
Handler = Annotated[
    str,
    messages(
        metavar="NAME", help="echo, upper, reverse, sha256, burn, or package.module:function."
    ),
]
HandlerTimeout = Annotated[
    float,
    messages(help="Offload: a batch running longer fails; its worker is replaced.", **DURATION),
]
FramingMode = Annotated[
    Framing, messages(help="raw: bytes as they come; line: one message per line.")
]
MaxLine = Annotated[int, messages(help="Longest line in bytes (line framing).", **SIZE)]

# -- connections
MaxConnections = Annotated[
    int, connections(min=1, metavar="N", help="Connections beyond this are closed at once.")
]
MaxPerIp = Annotated[
    int, connections(min=0, metavar="N", help="Per client address (after PROXY); 0: no limit.")
]
IdleTimeout = Annotated[
    float, connections(help="Close connections idle this long; 0: never.", **DURATION)
]
GracefulTimeout = Annotated[
    float, connections(help="On SIGTERM/SIGINT, deliver owed replies this long.", **DURATION)
]

# -- logs and metrics
Level = Annotated[LogLevel, observe(case_sensitive=False, help="Least severe level logged.")]
Verbose = Annotated[
    int,
    observe(
        "-v",
        "--verbose",
        count=True,
        show_default=False,
        help="Log more: each -v one level below --log-level (-v: debug).",
    ),
]
LogFile = Annotated[
    str | None,
    observe(metavar="PATH", show_default="stderr", help="Append the log here (SIGUSR1 reopens)."),
]
MetricsPort = Annotated[
    int | None,
    observe(min=0, max=65535, metavar="PORT", help="Prometheus metrics on 127.0.0.1:PORT."),
]

# -- processes
Workers = Annotated[
    int,
    processes(
        "-w",
        "--workers",
        help="Serving processes, each with its own event loop, under a supervisor "
        "(auto: one per CPU).",
        **WORKERS,
    ),
]
ReusePort = Annotated[
    bool,
    processes(help="With --workers: a SO_REUSEPORT listener per process (else one shared)."),
]

# -- daemon
Daemon = Annotated[
    bool, daemon("-D", "--daemon", help="Detach once serving; the command reports the outcome.")
]
Pidfile = Annotated[
    str | None,
    daemon(
        metavar="PATH",
        show_default="--daemon: aecho-PORT.pid in $XDG_RUNTIME_DIR or /tmp",
        help="Pidfile, locked while serving.",
    ),
]

# -- TLS and PROXY protocol
TlsCert = Annotated[
    str | None, tls_proxy(metavar="PEM", help="Certificate chain: serve TLS 1.2+ on the listeners.")
]
TlsKey = Annotated[str | None, tls_proxy(metavar="PEM", help="Private key for --tls-cert.")]
TlsHandshakeTimeout = Annotated[
    float, tls_proxy(help="Close a TLS connection whose handshake takes longer.", **DURATION)
]
Proxy = Annotated[
    ProxyMode, tls_proxy(help="Expect a PROXY protocol header (HAProxy) from trusted peers.")
]
ProxyAllowFrom = Annotated[
    list[str],
    tls_proxy(metavar="CIDR", help="Network whose peers must send a PROXY header; repeatable."),
]
