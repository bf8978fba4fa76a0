"""Frozen configuration objects: the one place that knows defaults and limits.

The CLI builds these; everything else reads them.  ``validate()`` raises
:class:`ConfigError` with a one-line message fit to show a user.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7007
DEFAULT_BACKLOG = 4096
DEFAULT_MAX_LINE = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_GRACEFUL_TIMEOUT = 10.0

# Per-connection write buffer watermarks.  Reading pauses above HIGH and resumes
# below LOW, so a peer that never reads costs at most about HIGH bytes of server
# memory (plus one kernel socket buffer).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


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


def somaxconn() -> int:
    """The kernel's cap on a listen backlog (Linux), or a conservative guess elsewhere."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 4096


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range: use 0 (any free port) to 65535")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix: str | None = None
    loop: LoopKind = LoopKind.auto
    offload: Offload = Offload.inline
    pool_size: int | None = None
    handler: str = "echo"
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

    @property
    def effective_backlog(self) -> int:
        return min(self.backlog, somaxconn())

    @property
    def effective_pool_size(self) -> int:
        return self.pool_size or os.cpu_count() or 1

    def validate(self) -> ServerConfig:
        """Return self when consistent.

        Raises:
            ConfigError: a value is out of range or options contradict each other.
        """
        _check_port(self.port)
        if not self.host:
            raise ConfigError("--host must not be empty")
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
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError("--pool-size must be at least 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"unknown --log-level {self.log_level!r}: use debug, info, warning, error"
            )
        return self


@dataclass(frozen=True, slots=True)
class ClientConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix: str | None = None
    connect_timeout: float = 5.0

    def validate(self) -> ClientConfig:
        """Return self when consistent.

        Raises:
            ConfigError: a value is out of range.
        """
        _check_port(self.port)
        if self.connect_timeout <= 0:
            raise ConfigError("--connect-timeout must be positive")
        return self


# -- bench ---------------------------------------------------------------------------------------

DEFAULT_BENCH_CONNECTIONS = 50
DEFAULT_BENCH_DURATION = 10.0
DEFAULT_BENCH_SIZE = 1024
DEFAULT_BENCH_TIMEOUT = 10.0
# Verification needs a sequence number in every payload; smaller payloads carry its low digits.
BENCH_HEADER_SIZE = 23


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
        if self.rate is not None and self.rate <= 0:
            raise ConfigError("--rate must be a positive number of messages per second")
        if self.warmup < 0:
            raise ConfigError("--warmup must be 0 or more seconds")
        if self.connect_rate is not None and self.connect_rate <= 0:
            raise ConfigError("--connect-rate must be a positive number of connections per second")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.workers > self.connections:
            raise ConfigError(
                f"--workers {self.workers} is more than -c {self.connections}: "
                "every worker needs at least one connection"
            )
        if self.timeout <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
        if self.max_p99_ms is not None and self.max_p99_ms <= 0:
            raise ConfigError("--max-p99 must be a positive number of milliseconds")
        if self.min_rate is not None and self.min_rate < 0:
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
        return self
