"""The ``aecho`` command line: parse options, build a config, call one function.

Every failure a user can cause ends as one line on stderr and a non-zero exit:
1 for runtime failures, 2 for usage errors.  Tracebacks go to the log at
debug level only.  How errors, help and ``--version`` look is
:mod:`aecho.commandline`'s business; the options of ``serve`` live in
:mod:`aecho.serve_options`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Annotated, Any, NoReturn

import typer

from aecho import bench_options as bo
from aecho import serve_options as opt
from aecho.address import host_and_port
from aecho.commandline import (
    DURATION,
    PREFIX,
    Command,
    Group,
    fail,
    show_version,
)
from aecho.config import (
    DEFAULT_BACKLOG,
    DEFAULT_BENCH_CONNECTIONS,
    DEFAULT_BENCH_DURATION,
    DEFAULT_BENCH_SIZE,
    DEFAULT_BENCH_TIMEOUT,
    DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_LINE,
    DEFAULT_PORT,
    DEFAULT_PROXY_ALLOW_FROM,
    DEFAULT_SEARCH_STEP,
    DEFAULT_SEARCH_WARMUP,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    BenchConfig,
    ClientConfig,
    ConfigError,
    Framing,
    LoopKind,
    Offload,
    ProxyMode,
    ServerConfig,
    check_paths,
    check_plot_file,
)
from aecho.process.logs import LogLevel, more_verbose, open_std_fds, setup_logging
from aecho.process.signals import held_signals
from aecho.units import AUTO_WORKERS


class _Aecho(Group):
    """The ``aecho`` group, and ``aecho bench merge FILE...``: a command of two words beside
    ``aecho bench [HOST] [PORT]``, so bench keeps its positional HOST and PORT."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args[:2] == ["bench", "merge"]:
            return "bench merge", typer.main.get_command(bench_merge_app), args[2:]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_Aecho,
    name="aecho",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("aecho")


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,
            callback=show_version,
            help="Print the version (and Python's, uvloop's, the system's) and exit.",
        ),
    ] = False,
) -> None:
    """A concurrent TCP echo service, an interactive client and a verifying load tester."""


# -- serve ---------------------------------------------------------------------------------------


@app.command(cls=Command)
def serve(
    host: opt.Host = DEFAULT_HOST,
    port: opt.Port = DEFAULT_PORT,
    unix: opt.Unix = None,
    loop: opt.Loop = LoopKind.auto,
    offload: opt.OffloadMode = Offload.inline,
    pool_size: opt.PoolSize = None,
    handler: opt.Handler = "echo",
    handler_timeout: opt.HandlerTimeout = DEFAULT_HANDLER_TIMEOUT,
    framing: opt.FramingMode = Framing.raw,
    max_line: opt.MaxLine = DEFAULT_MAX_LINE,
    max_connections: opt.MaxConnections = DEFAULT_MAX_CONNECTIONS,
    idle_timeout: opt.IdleTimeout = DEFAULT_IDLE_TIMEOUT,
    graceful_timeout: opt.GracefulTimeout = DEFAULT_GRACEFUL_TIMEOUT,
    backlog: opt.Backlog = DEFAULT_BACKLOG,
    log_level: opt.Level = LogLevel.info,
    verbose: opt.Verbose = 0,
    daemon: opt.Daemon = False,
    pidfile: opt.Pidfile = None,
    log_file: opt.LogFile = None,
    tls_cert: opt.TlsCert = None,
    tls_key: opt.TlsKey = None,
    tls_handshake_timeout: opt.TlsHandshakeTimeout = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    unix_mode: opt.UnixMode = "0660",
    udp: opt.Udp = False,
    proxy_protocol: opt.Proxy = ProxyMode.off,
    proxy_allow_from: opt.ProxyAllowFrom = list(DEFAULT_PROXY_ALLOW_FROM),  # noqa: B006 (shown)
    metrics_port: opt.MetricsPort = None,
    max_connections_per_ip: opt.MaxPerIp = 0,
    workers: opt.Workers = 1,
    reuse_port: opt.ReusePort = True,
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
            log_level=more_verbose(log_level, verbose),
            daemon=daemon,
            pidfile=pidfile,
            log_file=log_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_handshake_timeout=tls_handshake_timeout,
            unix_mode=mode,
            udp=udp,
            proxy_protocol=proxy_protocol,
            proxy_allow_from=tuple(proxy_allow_from),
            metrics_port=metrics_port,
            max_connections_per_ip=max_connections_per_ip,
            workers=workers,
            reuse_port=reuse_port,
        ).validate()
    except ConfigError as exc:
        fail(str(exc), 2)
    from aecho.offload.handlers import HandlerError
    from aecho.process.daemon import DaemonStarted
    from aecho.server.listeners import StartupError

    with held_signals():  # USR1, HUP, TTIN and TTOU wait for their handlers
        open_std_fds()
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
    prefix = PREFIX if outcome.error and outcome.code else "aecho: "
    typer.echo(prefix + outcome.message, err=outcome.error)
    raise typer.Exit(outcome.code)


PIDFILE_HELP = "The pidfile the server was started with."
PORT_HELP = "Or the port a daemon serves on: its default pidfile, aecho-PORT.pid."
UNIX_HELP = "Or the Unix socket a daemon serves on: its default pidfile, aecho-unix-NAME-*.pid."


def _which_pidfile(pidfile: str | None, port: int | None, unix: str | None) -> str:
    """The pidfile ``stop`` or ``status`` reads, named or found as ``serve --daemon`` names it.

    Exits 2 (a usage error) when none or more than one of the three was given, or a
    path is empty.
    """
    try:
        check_paths(pidfile=pidfile, unix=unix)
    except ConfigError as exc:
        fail(str(exc), 2)
    given = [name for name, v in (("--pidfile", pidfile), ("--port", port), ("--unix", unix)) if v]
    if not given:
        fail("which server? give --pidfile PATH, or the --port N (or --unix PATH) it serves on", 2)
    if len(given) > 1:
        fail(f"give one of {' and '.join(given)}: each names a pidfile", 2)
    if pidfile:
        return pidfile
    from aecho.process.pidfile import default_pidfile

    return default_pidfile(port, unix)


@app.command(cls=Command)
def stop(
    pidfile: Annotated[str | None, typer.Option(metavar="PATH", help=PIDFILE_HELP)] = None,
    port: Annotated[
        int | None, typer.Option("-p", "--port", min=1, max=65535, metavar="PORT", help=PORT_HELP)
    ] = None,
    unix: Annotated[str | None, typer.Option(metavar="PATH", help=UNIX_HELP)] = None,
    timeout: Annotated[
        float, typer.Option(min=0, help="Wait this long after SIGTERM before SIGKILL.", **DURATION)
    ] = 15.0,
) -> None:
    """Stop a server gracefully (SIGTERM), killing it past --timeout."""
    from aecho.process.control import stop as stop_main

    _print(stop_main(_which_pidfile(pidfile, port, unix), timeout, port, unix))


@app.command(cls=Command)
def status(
    pidfile: Annotated[str | None, typer.Option(metavar="PATH", help=PIDFILE_HELP)] = None,
    port: Annotated[
        int | None, typer.Option("-p", "--port", min=1, max=65535, metavar="PORT", help=PORT_HELP)
    ] = None,
    unix: Annotated[str | None, typer.Option(metavar="PATH", help=UNIX_HELP)] = None,
) -> None:
    """Is the server running? Exit 0 if so, 3 if not, 4 if its pidfile cannot be read."""
    from aecho.process.control import status as status_main

    _print(status_main(_which_pidfile(pidfile, port, unix), port, unix))


# -- client --------------------------------------------------------------------------------------


# One declaration for the client and bench, so the flag is spelled the same on both.
TlsFlag = Annotated[bool, typer.Option("--tls/--no-tls", help="Connect with TLS.")]


def run_client(config: ClientConfig) -> None:
    from aecho.client import run

    run(config)


def _die_of_sigpipe() -> NoReturn:
    """End as cat or grep end when their reader quits early: killed by SIGPIPE, silently.

    The shell then reports 141, so ``set -o pipefail`` still sees that the output was cut
    short, and nothing is printed.  Python ignores SIGPIPE, so restore it first.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    raise typer.Exit(128 + signal.SIGPIPE)  # not reached unless the signal is blocked


@app.command(cls=Command)
def client(
    host: Annotated[
        str,
        typer.Argument(
            metavar="HOST", help="Server address or name; HOST:PORT and [v6]:PORT work too."
        ),
    ] = DEFAULT_HOST,
    port: Annotated[
        int | None,
        typer.Argument(
            min=0, max=65535, metavar="PORT", show_default=str(DEFAULT_PORT), help="Server port."
        ),
    ] = None,
    unix: Annotated[
        str | None, typer.Option(metavar="PATH", help="Connect to this Unix socket instead.")
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the connection.", **DURATION)
    ] = 5.0,
    timeout: Annotated[
        float,
        typer.Option(
            help="Give up when the server sends nothing this long after the last byte sent; "
            "0 = wait forever.",
            **DURATION,
        ),
    ] = DEFAULT_CLIENT_TIMEOUT,
    tls: TlsFlag = False,
    cafile: Annotated[
        str | None,
        typer.Option(metavar="PEM", help="PEM CA bundle to verify the server (with --tls)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Do not verify the server certificate (--tls).")
    ] = False,
) -> None:
    """Talk to an echo server: a prompt on a terminal, a byte-exact pipe otherwise."""
    from aecho.client import ClientError, OutputClosed

    try:
        host, port = host_and_port(host, port, DEFAULT_HOST, DEFAULT_PORT)
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        config = ClientConfig(
            host=host,
            port=port,
            unix=unix,
            connect_timeout=connect_timeout,
            timeout=timeout,
            tls=tls,
            cafile=cafile,
            insecure=insecure,
        )
        run_client(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    except ClientError as exc:
        fail(str(exc))
    except OutputClosed:
        _die_of_sigpipe()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# -- bench ---------------------------------------------------------------------------------------


@app.command(cls=Command)
def bench(
    ctx: typer.Context,
    host: bo.Host = None,
    port: bo.Port = None,
    connections: bo.Connections = DEFAULT_BENCH_CONNECTIONS,
    duration: bo.Duration = DEFAULT_BENCH_DURATION,
    messages: bo.Messages = None,
    size: bo.Size = DEFAULT_BENCH_SIZE,
    pipeline: bo.Pipeline = 1,
    rate: bo.Rate = None,
    warmup: bo.Warmup = 0.0,
    connect_rate: bo.ConnectRate = None,
    workers: bo.Workers = 1,
    unix: bo.Unix = None,
    timeout: bo.Timeout = DEFAULT_BENCH_TIMEOUT,
    framing: bo.Framing = Framing.raw,
    json_out: bo.Json = False,
    max_p99: bo.MaxP99 = None,
    find_max_rate: bo.FindMaxRate = False,
    min_rate: bo.MinRate = None,
    plot: bo.Plot = None,
    offload: bo.OffloadMode = Offload.inline,
    handler: bo.Handler = "echo",
    tls: TlsFlag = False,
    cafile: bo.Cafile = None,
    insecure: bo.Insecure = False,
    loop: bo.Loop = LoopKind.auto,
) -> None:
    """Load-test an echo server and verify every byte (no HOST/PORT: an embedded server).

    aecho bench merge RESULT.json... combines --json results of runs made side by side.
    """
    from aecho.bench import main as bench_main
    from aecho.bench.errors import BenchError
    from aecho.offload.handlers import HandlerError

    # -n alone measures messages, not the default duration; -n with -d is refused below.
    # --find-max-rate steps are shorter than a run, with a warm-up, unless -d/--warmup say.
    until: float | None = duration
    if _defaulted(ctx, "duration"):
        until = None if messages is not None else (DEFAULT_SEARCH_STEP if find_max_rate else until)
    if _defaulted(ctx, "warmup") and find_max_rate:
        warmup = DEFAULT_SEARCH_WARMUP
    if host is not None:
        try:
            host, port = host_and_port(host, port, DEFAULT_HOST, DEFAULT_PORT)
        except ValueError as exc:
            fail(str(exc), 2)
    if workers == AUTO_WORKERS:
        workers = max(1, min(os.cpu_count() or 1, connections))
    try:
        config = BenchConfig(
            host=host,
            port=port,
            unix=unix,
            connections=connections,
            duration=until,
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
            find_max_rate=find_max_rate,
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


def _defaulted(ctx: typer.Context, name: str) -> bool:
    """Was option ``name`` left at its default (not given on the command line)?"""
    return getattr(ctx.get_parameter_source(name), "name", "") == "DEFAULT"


bench_merge_app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@bench_merge_app.command(cls=Command)
def bench_merge(results: bo.Results, json_out: bo.Json = False, plot: bo.Plot = None) -> None:
    """Combine runs made side by side (say, one per machine) into the result one bench with
    all their load would have reported: counts summed, percentiles from the merged histogram.
    """
    from aecho.bench import merge
    from aecho.bench.errors import BenchError

    try:
        if plot is not None:
            check_plot_file(plot)
    except ConfigError as exc:
        fail(str(exc), 2)
    try:
        code = merge(results, json_out, plot)
    except ConfigError as exc:  # a --plot file that cannot be written
        fail(str(exc), 2)
    except BenchError as exc:
        fail(str(exc))
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    app(args=sys.argv[1:] if argv is None else argv, prog_name="aecho")


if __name__ == "__main__":
    main()
