"""The ``aecho`` command line: parse options, build a config, call one function.

Every failure a user can cause ends as one line on stderr and a non-zero exit:
1 for runtime failures, 2 for usage errors.  Tracebacks go to the log at
debug level only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
import typer.core

from aecho.config import (
    DEFAULT_BACKLOG,
    DEFAULT_BENCH_CONNECTIONS,
    DEFAULT_BENCH_DURATION,
    DEFAULT_BENCH_SIZE,
    DEFAULT_BENCH_TIMEOUT,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_LINE,
    DEFAULT_PORT,
    DEFAULT_PROXY_ALLOW_FROM,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    BenchConfig,
    ClientConfig,
    ConfigError,
    Framing,
    LoopKind,
    Offload,
    ProxyMode,
    ServerConfig,
)
from aecho.process.logs import setup_logging
from aecho.units import parse_duration, parse_rate, parse_size


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors as one line (``aecho serve: error: ...``) and exit 2, not a panel."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else (prog_name or "aecho")
            code = getattr(exc, "exit_code", 1)
            hint = f" (see '{where} --help')" if code == 2 else ""
            typer.echo(f"{where}: error: {exc.format_message()}{hint}", err=True)
            rv = code
        except typer.Abort:
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="aecho",
    help="A concurrent TCP echo service, an interactive client and a verifying load tester.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("aecho")


def _units(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A typer ``parser`` from a units parser: its ValueError becomes a usage error."""

    def parser(value: str) -> Any:
        if not isinstance(value, str):  # a default, already parsed
            return value
        try:
            return parse(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parser


DURATION = {"parser": _units(parse_duration), "metavar": "DURATION"}
SIZE = {"parser": _units(parse_size), "metavar": "SIZE"}
RATE = {"parser": _units(parse_rate), "metavar": "RATE"}


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line on stderr and exit."""
    typer.echo(f"aecho: error: {message}", err=True)
    raise typer.Exit(code)


# -- serve ---------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address or name to listen on (IPv4, IPv6).")] = (
        DEFAULT_HOST
    ),
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port; 0 picks a free one (logged).")
    ] = DEFAULT_PORT,
    unix: Annotated[
        str | None, typer.Option(help="Listen on this Unix socket path instead of TCP.")
    ] = None,
    loop: Annotated[LoopKind, typer.Option(help="Event loop implementation.")] = LoopKind.auto,
    offload: Annotated[
        Offload, typer.Option(help="Run the handler on the loop or in worker processes.")
    ] = Offload.inline,
    pool_size: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default: CPU count).")
    ] = None,
    handler: Annotated[
        str,
        typer.Option(help="echo, upper, reverse, sha256, burn, or package.module:function."),
    ] = "echo",
    handler_timeout: Annotated[
        float,
        typer.Option(
            help="Process offload: a batch running longer (s) fails; its worker is replaced.",
            **DURATION,
        ),
    ] = DEFAULT_HANDLER_TIMEOUT,
    framing: Annotated[
        Framing, typer.Option(help="raw: bytes as they come; line: one message per line.")
    ] = Framing.raw,
    max_line: Annotated[
        int, typer.Option(help="Longest line in bytes (line framing).", **SIZE)
    ] = DEFAULT_MAX_LINE,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Connections beyond this are closed at once.")
    ] = DEFAULT_MAX_CONNECTIONS,
    idle_timeout: Annotated[
        float, typer.Option(help="Close connections idle this long (s); 0 = never.", **DURATION)
    ] = DEFAULT_IDLE_TIMEOUT,
    graceful_timeout: Annotated[
        float, typer.Option(help="On SIGTERM/SIGINT, wait this long (s) for replies.", **DURATION)
    ] = DEFAULT_GRACEFUL_TIMEOUT,
    backlog: Annotated[
        int, typer.Option(min=1, help="Listen backlog (capped by net.core.somaxconn).")
    ] = DEFAULT_BACKLOG,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    daemon: Annotated[
        bool, typer.Option("--daemon", help="Detach once serving; the command reports the outcome.")
    ] = False,
    pidfile: Annotated[
        str | None,
        typer.Option(help="Pidfile, locked while serving (--daemon default: aecho-PORT.pid)."),
    ] = None,
    log_file: Annotated[
        str | None, typer.Option(help="Append the log here (reopened on SIGHUP).")
    ] = None,
    tls_cert: Annotated[
        str | None, typer.Option(help="PEM certificate chain: serve TLS (1.2+) on the listeners.")
    ] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key for --tls-cert.")] = None,
    tls_handshake_timeout: Annotated[
        float,
        typer.Option(help="Close a TLS connection whose handshake takes longer (s).", **DURATION),
    ] = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    unix_mode: Annotated[
        str, typer.Option(help="Octal permissions of the --unix socket file.")
    ] = "0660",
    udp: Annotated[
        bool, typer.Option("--udp", help="Also echo UDP datagrams on the same port.")
    ] = False,
    proxy_protocol: Annotated[
        ProxyMode, typer.Option(help="Expect a PROXY protocol header (HAProxy) from trusted peers.")
    ] = ProxyMode.off,
    proxy_allow_from: Annotated[
        list[str] | None,
        typer.Option(
            help="Network (CIDR) whose peers must send a PROXY header; repeatable "
            "[default: 127.0.0.1/32 and ::1/128]."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Serve Prometheus metrics on 127.0.0.1:PORT."),
    ] = None,
    max_connections_per_ip: Annotated[
        int, typer.Option(min=0, help="Connections per client address (after PROXY); 0 = any.")
    ] = 0,
) -> None:
    """Run the echo server (SIGTERM or Ctrl-C stops it gracefully; --daemon detaches)."""
    try:
        mode = int(unix_mode, 8)
    except ValueError:
        fail(f"bad --unix-mode {unix_mode!r}: use octal permissions such as 0660", 2)
    try:
        config = ServerConfig(
            host=host,
            port=port,
            unix=unix,
            loop=loop,
            offload=offload,
            pool_size=pool_size,
            handler=handler,
            handler_timeout=handler_timeout,
            framing=framing,
            max_line=max_line,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            graceful_timeout=graceful_timeout,
            backlog=backlog,
            log_level=log_level,
            daemon=daemon,
            pidfile=pidfile,
            log_file=log_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_handshake_timeout=tls_handshake_timeout,
            unix_mode=mode,
            udp=udp,
            proxy_protocol=proxy_protocol,
            proxy_allow_from=tuple(proxy_allow_from or DEFAULT_PROXY_ALLOW_FROM),
            metrics_port=metrics_port,
            max_connections_per_ip=max_connections_per_ip,
        ).validate()
    except ConfigError as exc:
        fail(str(exc), 2)
    from aecho.offload.handlers import HandlerError
    from aecho.process.daemon import DaemonStarted
    from aecho.server.listeners import StartupError

    try:
        setup_logging(config.log_level, config.log_file)
    except OSError as exc:
        fail(f"cannot open --log-file {config.log_file}: {exc.strerror}")
    try:
        code = run_server(config)
    except DaemonStarted as started:
        where = f", pidfile {started.pidfile}" if started.pidfile else ""
        typer.echo(f"aecho serving on {started.address} (pid {started.pid}{where})")
        raise typer.Exit(0) from None
    except (StartupError, HandlerError, ConfigError) as exc:
        log.debug("start-up failed", exc_info=True)
        fail(str(exc))
    raise typer.Exit(code or 0)


def run_server(config: ServerConfig) -> int:
    """Serve until stopped; the exit status (see :func:`aecho.process.serve.serve`)."""
    from aecho.process.serve import serve as serve_main

    return serve_main(config)


def _print(outcome: Any) -> None:
    """Print a control outcome (``aecho: ...``) where it belongs and exit with its code."""
    prefix = "aecho: error: " if outcome.error and outcome.code else "aecho: "
    typer.echo(prefix + outcome.message, err=outcome.error)
    raise typer.Exit(outcome.code)


@app.command()
def stop(
    pidfile: Annotated[str, typer.Option(help="The pidfile the server was started with.")],
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait after SIGTERM before SIGKILL.")
    ] = 15.0,
) -> None:
    """Stop a server gracefully (SIGTERM), killing it past --timeout."""
    from aecho.process.control import stop as stop_main

    _print(stop_main(pidfile, timeout))


@app.command()
def status(
    pidfile: Annotated[str, typer.Option(help="The pidfile the server was started with.")],
) -> None:
    """Is the server running? Exit 0 if so, 3 if not."""
    from aecho.process.control import status as status_main

    _print(status_main(pidfile))


# -- client --------------------------------------------------------------------------------------


def run_client(config: ClientConfig) -> None:
    from aecho.client import run

    run(config)


@app.command()
def client(
    host: Annotated[str, typer.Argument(help="Server address or name.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Argument(min=0, max=65535, help="Server port.")] = DEFAULT_PORT,
    unix: Annotated[str | None, typer.Option(help="Connect to this Unix socket instead.")] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the connection.", **DURATION)
    ] = 5.0,
    tls: Annotated[bool, typer.Option("--tls", help="Connect with TLS.")] = False,
    cafile: Annotated[
        str | None, typer.Option(help="PEM CA bundle to verify the server (with --tls).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Do not verify the server certificate (--tls).")
    ] = False,
) -> None:
    """Talk to an echo server: a prompt on a terminal, a byte-exact pipe otherwise."""
    from aecho.client import ClientError

    try:
        config = ClientConfig(
            host=host,
            port=port,
            unix=unix,
            connect_timeout=connect_timeout,
            tls=tls,
            cafile=cafile,
            insecure=insecure,
        )
        run_client(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    except ClientError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# -- bench ---------------------------------------------------------------------------------------


@app.command()
def bench(
    host: Annotated[
        str | None, typer.Argument(help="Server to measure; none: start an embedded one.")
    ] = None,
    port: Annotated[
        int | None, typer.Argument(min=0, max=65535, help=f"Server port [default: {DEFAULT_PORT}].")
    ] = None,
    connections: Annotated[
        int, typer.Option("-c", "--connections", min=1, help="Concurrent connections.")
    ] = DEFAULT_BENCH_CONNECTIONS,
    duration: Annotated[
        float | None,
        typer.Option(
            "-d",
            "--duration",
            help=f"Seconds to measure [default: {DEFAULT_BENCH_DURATION:g}].",
            **DURATION,
        ),
    ] = None,
    messages: Annotated[
        int | None, typer.Option("-n", "--messages", help="Messages in total, then stop.")
    ] = None,
    size: Annotated[
        int, typer.Option("-s", "--size", help="Bytes per message.", **SIZE)
    ] = DEFAULT_BENCH_SIZE,
    pipeline: Annotated[
        int, typer.Option(min=1, help="Messages in flight per connection (1: ping-pong).")
    ] = 1,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Open loop: total messages/s, sent on schedule; latency from it.", **RATE
        ),
    ] = None,
    warmup: Annotated[
        float, typer.Option(help="Seconds of load left out of the results.", **DURATION)
    ] = 0.0,
    connect_rate: Annotated[
        float | None, typer.Option(help="Open connections at most this fast (per second).", **RATE)
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Load-generating processes; results merged exactly.")
    ] = 1,
    unix: Annotated[
        str | None, typer.Option(help="Measure the server on this Unix socket.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a connection or a reply.", **DURATION)
    ] = DEFAULT_BENCH_TIMEOUT,
    framing: Annotated[
        Framing, typer.Option(help="raw: any bytes; line: newline-terminated messages.")
    ] = Framing.raw,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else.")
    ] = False,
    max_p99: Annotated[
        float | None, typer.Option(help="Exit 1 if p99 latency is above this many ms.")
    ] = None,
    min_rate: Annotated[
        float | None, typer.Option(help="Exit 1 if fewer messages/s than this.")
    ] = None,
    plot: Annotated[
        str | None, typer.Option(help="Write throughput and latency curves to this PNG.")
    ] = None,
    offload: Annotated[
        Offload, typer.Option(help="Embedded server: run the handler inline or in processes.")
    ] = Offload.inline,
    handler: Annotated[
        str, typer.Option(help="The server's handler (embedded: passed on; replies checked).")
    ] = "echo",
    tls: Annotated[bool, typer.Option(help="Connect with TLS.")] = False,
    cafile: Annotated[str | None, typer.Option(help="TLS: trust the CAs in this PEM file.")] = None,
    insecure: Annotated[
        bool, typer.Option(help="TLS: do not verify the server's certificate.")
    ] = False,
    loop: Annotated[LoopKind, typer.Option(help="Event loop implementation.")] = LoopKind.auto,
) -> None:
    """Load-test an echo server and verify every byte (no HOST/PORT: an embedded server)."""
    from aecho.bench import main as bench_main
    from aecho.bench.engine import BenchError
    from aecho.offload.handlers import HandlerError

    if duration is None and messages is None:
        duration = DEFAULT_BENCH_DURATION
    try:
        config = BenchConfig(
            host=host,
            port=port,
            unix=unix,
            connections=connections,
            duration=duration,
            messages=messages,
            size=size,
            pipeline=pipeline,
            rate=rate,
            warmup=warmup,
            connect_rate=connect_rate,
            workers=workers,
            timeout=timeout,
            framing=framing,
            json=json_out,
            max_p99_ms=max_p99,
            min_rate=min_rate,
            plot=plot,
            offload=offload,
            handler=handler,
            tls=tls,
            cafile=cafile,
            insecure=insecure,
            loop=loop,
        ).validate()
    except ConfigError as exc:
        fail(str(exc), 2)
    try:
        code = bench_main(config)
    except (ConfigError, HandlerError) as exc:
        fail(str(exc), 2)
    except BenchError as exc:
        log.debug("bench failed", exc_info=True)
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    app(args=sys.argv[1:] if argv is None else argv, prog_name="aecho")


if __name__ == "__main__":
    main()
