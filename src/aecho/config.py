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
DEFAULT_HANDLER_TIMEOUT = 30.0

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
        if not self.handler_timeout > 0:
            raise ConfigError("--handler-timeout must be a positive number of seconds")
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
