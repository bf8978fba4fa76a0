"""Frozen configuration objects: the one place that knows defaults and limits.

The CLI builds these; everything else reads them.  Server and client configs are
checked when they are made: enum fields given as plain strings are converted, and
an inconsistent value raises :class:`ConfigError` with a one-line message fit to
show a user, so an invalid configuration cannot exist.  ``validate()`` stays for
callers that want the checked config back in one expression.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7007
DEFAULT_BACKLOG = 4096
DEFAULT_MAX_LINE = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_GRACEFUL_TIMEOUT = 10.0
DEFAULT_HANDLER_TIMEOUT = 30.0
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0

# Per-connection write buffer watermarks.  Reading pauses above HIGH and resumes
# below LOW, so a peer that never reads costs at most about HIGH bytes of server
# memory (plus one kernel socket buffer).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

# Offload: bytes a connection may hold in the pool and in replies not yet written, and
# bytes every connection of a server together may hold there.  Each message is charged
# MESSAGE_COST beyond its length for the objects that carry it (message, reply, encoded
# reply, list slots: about that much for a short line).
POOL_WINDOW = 256 * 1024
POOL_BUDGET = 8 * 1024 * 1024
MESSAGE_COST = 256

DEFAULT_UNIX_MODE = 0o660
DEFAULT_PROXY_ALLOW_FROM = ("127.0.0.1/32", "::1/128")
# Seconds a PROXY protocol header may take to arrive after the connection opens.
PROXY_HEADER_TIMEOUT = 3.0


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; str() is the user message."""


class LoopKind(enum.StrEnum):
    auto = "auto"
    uvloop = "uvloop"
    asyncio = "asyncio"


class Offload(enum.StrEnum):
    inline = "inline"
    process = "process"


class Framing(enum.StrEnum):
    raw = "raw"
    line = "line"


class ProxyMode(enum.StrEnum):
    off = "off"
    v1 = "v1"
    v2 = "v2"
    auto = "auto"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """Parse ``--proxy-allow-from`` values (a bare address means just that host).

    Raises:
        ConfigError: a value is not an IPv4 or IPv6 network.
    """
    nets: list[Network] = []
    for cidr in cidrs:
        try:
            nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"bad --proxy-allow-from {cidr!r}: use a network such as 10.0.0.0/8 or ::1/128"
            ) from None
    return tuple(nets)


def somaxconn() -> int:
    """The kernel's cap on a listen backlog (Linux), or a conservative guess elsewhere."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 4096


def _convert(obj: object, name: str, kind: type[enum.StrEnum], option: str) -> None:
    """Make ``obj.name`` a member of ``kind``.

    Raises:
        ConfigError: the value is not one of the members.
    """
    value = getattr(obj, name)
    try:
        object.__setattr__(obj, name, kind(value))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"unknown {option} {value!r}: use one of {choices}") from None


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range: use 0 (any free port) to 65535")


def check_paths(**paths: str | None) -> None:
    """An empty path (an unset shell variable, say) is a mistake, never "not given".

    Raises:
        ConfigError: one of ``paths`` (option name without dashes, ``_`` for ``-``) is "".
    """
    for name, value in paths.items():
        if value == "":
            raise ConfigError(f"--{name.replace('_', '-')} must not be empty: give a path")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix: str | None = None
    loop: LoopKind = LoopKind.auto
    offload: Offload = Offload.inline
    pool_size: int | None = None
    handler: str = "echo"
    handler_timeout: float = DEFAULT_HANDLER_TIMEOUT
    framing: Framing = Framing.raw
    max_line: int = DEFAULT_MAX_LINE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    backlog: int = DEFAULT_BACKLOG
    daemon: bool = False
    pidfile: str | None = None
    log_file: str | None = None
    log_level: str = "INFO"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    unix_mode: int = DEFAULT_UNIX_MODE
    udp: bool = False
    proxy_protocol: ProxyMode = ProxyMode.off
    proxy_allow_from: tuple[str, ...] = DEFAULT_PROXY_ALLOW_FROM
    metrics_port: int | None = None
    max_connections_per_ip: int = 0
    # Serving processes: 1 is a single process; more run under a supervisor.
    workers: int = 1
    # With workers > 1: one SO_REUSEPORT listener per serving process (else one shared).
    reuse_port: bool = True
    # Where package.module:function handlers are imported from first (None: the working
    # directory).  A daemon changes to / before it loads its handler, so the command
    # fixes this beforehand.
    handler_dir: str | None = None
    # Per-connection write buffer watermarks (see WRITE_HIGH_WATER).
    write_high: int = WRITE_HIGH_WATER
    write_low: int = WRITE_LOW_WATER
    # Offload memory bounds (see POOL_WINDOW).
    pool_window: int = POOL_WINDOW
    pool_budget: int = POOL_BUDGET

    def __post_init__(self) -> None:
        # Plain strings for the enum fields (tests, embedding code) become members,
        # so `proxy_protocol="off"` means ProxyMode.off and not "some mode".
        _convert(self, "loop", LoopKind, "--loop")
        _convert(self, "offload", Offload, "--offload")
        _convert(self, "framing", Framing, "--framing")
        _convert(self, "proxy_protocol", ProxyMode, "--proxy-protocol")
        object.__setattr__(self, "log_level", self.log_level.upper())
        self._check()

    @property
    def effective_backlog(self) -> int:
        return min(self.backlog, somaxconn())

    @property
    def effective_pool_size(self) -> int:
        """--pool-size, else the CPUs shared out among the serving processes."""
        return self.pool_size or max(1, (os.cpu_count() or 1) // self.workers)

    def validate(self) -> ServerConfig:
        """Return self (checked when made)."""
        return self

    def _check(self) -> None:
        """Raises: ConfigError: a value is out of range or options contradict each other."""
        _check_port(self.port)
        if not self.host:
            raise ConfigError("--host must not be empty")
        check_paths(
            unix=self.unix,
            pidfile=self.pidfile,
            log_file=self.log_file,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
        )
        if self.max_line < 1:
            raise ConfigError("--max-line must be at least 1 byte")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        if self.idle_timeout < 0:
            raise ConfigError("--idle-timeout must be 0 (never) or a positive number of seconds")
        if self.graceful_timeout < 0:
            raise ConfigError("--graceful-timeout must be 0 or more seconds")
        if self.backlog < 1:
            raise ConfigError("--backlog must be at least 1")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1 (or auto)")
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError("--pool-size must be at least 1")
        if not self.handler_timeout > 0:
            raise ConfigError("--handler-timeout must be a positive number of seconds")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"unknown --log-level {self.log_level!r}: use debug, info, warning, error"
            )
        if not 0 < self.write_low <= self.write_high:
            raise ConfigError("write buffer watermarks must satisfy 0 < low <= high")
        if not 0 < self.pool_window <= self.pool_budget // 2:
            raise ConfigError("the pool window must be positive and at most half the budget")
        self._validate_edge()

    def _validate_edge(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if not self.tls_handshake_timeout > 0:
            raise ConfigError("--tls-handshake-timeout must be a positive number of seconds")
        if not 0 <= self.unix_mode <= 0o777:
            raise ConfigError(f"--unix-mode {self.unix_mode:o} is not a permission mode (0-777)")
        if self.udp and self.unix:
            raise ConfigError("--udp needs a TCP port: it cannot be combined with --unix")
        if self.proxy_protocol is not ProxyMode.off and self.tls_cert:
            raise ConfigError(
                "--proxy-protocol with --tls-cert is not supported: terminate TLS at the proxy"
            )
        parse_networks(self.proxy_allow_from)
        if self.metrics_port is not None:
            _check_port(self.metrics_port)
        if self.max_connections_per_ip < 0:
            raise ConfigError("--max-connections-per-ip must be 0 (no limit) or more")


DEFAULT_CLIENT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """``aecho client``.  ``timeout``: seconds of silence from the server, once something was
    sent, before giving up; 0 waits forever."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix: str | None = None
    connect_timeout: float = 5.0
    timeout: float = DEFAULT_CLIENT_TIMEOUT
    tls: bool = False
    cafile: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        self._check()

    def validate(self) -> ClientConfig:
        """Return self (checked when made)."""
        return self

    def _check(self) -> None:
        """Raises: ConfigError: a value is out of range."""
        _check_port(self.port)
        check_paths(unix=self.unix, cafile=self.cafile)
        if self.connect_timeout <= 0:
            raise ConfigError("--connect-timeout must be positive")
        if self.timeout < 0:
            raise ConfigError("--timeout must be 0 (wait forever) or positive")
        if (self.cafile or self.insecure) and not self.tls:
            raise ConfigError("--cafile and --insecure only apply with --tls")
        if self.cafile and self.insecure:
            raise ConfigError("--cafile and --insecure contradict each other: choose one")


# -- bench ---------------------------------------------------------------------------------------

DEFAULT_BENCH_CONNECTIONS = 50
DEFAULT_BENCH_DURATION = 10.0
DEFAULT_BENCH_SIZE = 1024
DEFAULT_BENCH_TIMEOUT = 10.0
# Verification needs a sequence number in every payload; smaller payloads carry its low digits.
BENCH_HEADER_SIZE = 23
# --find-max-rate: each step's measured time and warm-up unless -d / --warmup say otherwise.
MIN_RATE = 0.001  # below it a connection's period overflows the pacer's arithmetic
DEFAULT_SEARCH_STEP = 2.0
DEFAULT_SEARCH_WARMUP = 0.5


def check_plot_file(path: str) -> None:
    """Raises: ConfigError: ``path`` names neither a PNG nor an SVG file."""
    if not path.lower().endswith((".png", ".svg")):
        raise ConfigError(f"--plot {path}: name a .png or .svg file")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """``aecho bench``: what to measure and how.  No host, port and unix means "embedded":
    bench starts its own ``aecho serve --port 0`` and stops it afterwards."""

    host: str | None = None
    port: int | None = None
    unix: str | None = None
    connections: int = DEFAULT_BENCH_CONNECTIONS
    duration: float | None = DEFAULT_BENCH_DURATION
    messages: int | None = None
    size: int = DEFAULT_BENCH_SIZE
    pipeline: int = 1
    rate: float | None = None
    warmup: float = 0.0
    connect_rate: float | None = None
    workers: int = 1
    timeout: float = DEFAULT_BENCH_TIMEOUT
    framing: Framing = Framing.raw
    json: bool = False
    max_p99_ms: float | None = None
    min_rate: float | None = None
    plot: str | None = None
    offload: Offload = Offload.inline
    handler: str = "echo"
    tls: bool = False
    cafile: str | None = None
    insecure: bool = False
    loop: LoopKind = LoopKind.auto
    find_max_rate: bool = False  # search open-loop rates for the highest within --max-p99

    def __post_init__(self) -> None:
        _convert(self, "framing", Framing, "--framing")
        _convert(self, "offload", Offload, "--offload")
        _convert(self, "loop", LoopKind, "--loop")

    @property
    def embedded(self) -> bool:
        return self.host is None and self.port is None and self.unix is None

    @property
    def target(self) -> str:
        if self.unix:
            return self.unix
        host = self.host or DEFAULT_HOST
        port = DEFAULT_PORT if self.port is None else self.port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def validate(self) -> BenchConfig:
        """Return self when consistent.

        Raises:
            ConfigError: a value is out of range or options contradict each other.
        """
        if self.port is not None:
            _check_port(self.port)
        check_paths(unix=self.unix, plot=self.plot, cafile=self.cafile)
        if self.unix and (self.host is not None or self.port is not None):
            raise ConfigError("give either HOST PORT or --unix PATH, not both")
        if self.connections < 1:
            raise ConfigError("-c/--connections must be at least 1")
        if self.messages is not None and self.duration is not None:
            raise ConfigError("give either -d/--duration or -n/--messages, not both")
        if self.messages is None and self.duration is None:
            raise ConfigError("give -d/--duration or -n/--messages")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError("-d/--duration must be a positive number of seconds")
        if self.messages is not None and self.messages < 1:
            raise ConfigError("-n/--messages must be at least 1")
        if self.size < 1:
            raise ConfigError("-s/--size must be at least 1 byte")
        if self.pipeline < 1:
            raise ConfigError("--pipeline must be at least 1")
        if self.rate is not None and not self.rate >= MIN_RATE:
            raise ConfigError(
                f"--rate must be at least {MIN_RATE:g} messages per second (one in 1000 s)"
            )
        if self.warmup < 0:
            raise ConfigError("--warmup must be 0 or more seconds")
        if self.connect_rate is not None and self.connect_rate <= 0:
            raise ConfigError("--connect-rate must be a positive number of connections per second")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1 (or auto)")
        if self.workers > self.connections:
            raise ConfigError(
                f"--workers {self.workers} is more than -c {self.connections}: "
                "every worker needs at least one connection"
            )
        if self.timeout <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
        # NaN compares false with everything: a gate of NaN would pass every run.
        if self.max_p99_ms is not None and not (
            math.isfinite(self.max_p99_ms) and self.max_p99_ms > 0
        ):
            raise ConfigError("--max-p99 must be a positive number of milliseconds")
        if self.min_rate is not None and not (math.isfinite(self.min_rate) and self.min_rate >= 0):
            raise ConfigError("--min-rate must be 0 or more messages per second")
        if self.framing is Framing.line and self.size > DEFAULT_MAX_LINE:
            raise ConfigError(
                f"-s {self.size} is longer than the server's default --max-line "
                f"({DEFAULT_MAX_LINE}); use a smaller size with --framing line"
            )
        if (self.cafile or self.insecure) and not self.tls:
            raise ConfigError("--cafile and --insecure only make sense with --tls")
        if self.tls and self.unix:
            raise ConfigError("--tls works over TCP only, not with --unix")
        if self.tls and self.embedded:
            raise ConfigError("--tls needs the HOST and PORT of a TLS server to measure")
        if not self.embedded and (self.offload is not Offload.inline):
            raise ConfigError("--offload applies to the embedded server only (no HOST/PORT)")
        if self.plot is not None:
            check_plot_file(self.plot)
        if self.find_max_rate:
            self._validate_search()
        return self

    def _validate_search(self) -> None:
        if self.max_p99_ms is None:
            raise ConfigError("--find-max-rate needs the latency goal: add --max-p99 MS")
        if self.rate is not None:
            raise ConfigError("--find-max-rate chooses the rates itself: drop --rate")
        if self.messages is not None:
            raise ConfigError("--find-max-rate runs steps of -d seconds: drop -n")
        if self.min_rate is not None:
            raise ConfigError("--min-rate does not apply to --find-max-rate")
