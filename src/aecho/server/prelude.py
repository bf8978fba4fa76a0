"""What a connection's first phase (PROXY header, TLS handshake) has in common.

A prelude is a protocol of its own that runs before the connection that serves the
peer exists.  The server counts it from accept (``--max-connections``, and the per-IP
limit when the peer is known then) and sweeps it at shutdown and when idle, through
the same face a :class:`~aecho.server.connection.Connection` shows.
"""

from __future__ import annotations

from typing import Protocol

from aecho.config import ServerConfig
from aecho.server.connection import Tracked
from aecho.server.stats import Stats


class PreludeHost(Protocol):
    """What a prelude needs from the server that owns it."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stats(self) -> Stats: ...

    def hold(self, prelude: Prelude, per_ip: bool = False) -> bool:
        """Count a connection not served yet; False when it must be refused.

        ``per_ip``: the peer is the real client, so the per-IP limit applies now.
        """
        ...

    def release(self, prelude: Prelude) -> None:
        """The prelude is over: handed over, refused or gone."""
        ...

    def proxy_trusted(self, peer: object) -> bool:
        """Whether ``peer`` may (and must) speak for someone else."""
        ...


class Prelude(Tracked):
    __slots__ = ("host",)

    def __init__(self, host: PreludeHost) -> None:
        super().__init__()
        self.host = host
