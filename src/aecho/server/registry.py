"""The connection registry of one serving process: who is open, and the limits on who may be.

Every connection and prelude is admitted, held, released and forgotten here; the
limits (``server.limits``) decide, local or shared with other serving processes.
:class:`~aecho.server.server.Server` is a registry: this is what a connection's
``Host`` and a prelude's ``PreludeHost`` are, by the server's side.
"""

from __future__ import annotations

import ipaddress
import logging

from aecho.address import format_address
from aecho.config import ServerConfig, parse_networks
from aecho.server.connection import Connection
from aecho.server.limits import Limits
from aecho.server.prelude import Prelude
from aecho.server.stats import Stats
from aecho.text import plural

log = logging.getLogger("aecho.server")


class Registry:
    """Open connections and preludes, counted against the limits."""

    def __init__(self, config: ServerConfig, limits: Limits | None) -> None:
        self._config = config
        self._stats = Stats()
        self.connections: set[Connection] = set()
        # Connections still in their prelude (PROXY header, TLS handshake): counted,
        # not yet served.  The value: the address counted against the per-IP limit.
        self.preludes: dict[Prelude, str | None] = {}
        self._limits = limits or Limits(config.max_connections, config.max_connections_per_ip)
        self._proxy_networks = parse_networks(config.proxy_allow_from)

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def stats(self) -> Stats:
        return self._stats

    def _full(self) -> bool:
        # Not refused for stopping: a connection the listener accepted just before it
        # closed reaches us a moment later, and it is owed service like the others.
        if self._limits.full(len(self.connections) + len(self.preludes)):
            self._stats.refused += 1
            return True
        return False

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False when it must be refused."""
        prelude, conn.takes_over = conn.takes_over, None
        if isinstance(prelude, Prelude) and prelude in self.preludes:
            return self._take_place(conn, prelude)
        if self._full():
            log.debug(
                "refusing %s: %s open",
                format_address(conn.peer),
                plural(len(self.connections), "connection"),
            )
            return False
        if not self._count_ip(conn.peer)[0]:
            self._limits.counted(len(self.connections) + len(self.preludes))
            return False
        self._stats.accepted += 1
        self.connections.add(conn)
        self._limits.counted(len(self.connections) + len(self.preludes))
        return True

    def _take_place(self, conn: Connection, prelude: Prelude) -> bool:
        """Move a finished prelude's place to the connection that serves its peer.

        The place never becomes free in between: under ``--workers`` another process
        could otherwise take the last one, and a finished handshake would be refused.
        The per-IP count moves with it; a PROXY prelude counted none (the real client
        is known only now), so the client is counted here, and may be refused.
        """
        if self.preludes.pop(prelude) is None and not self._count_ip(conn.peer)[0]:
            self._limits.counted(len(self.connections) + len(self.preludes))
            return False
        self._stats.accepted += 1
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.remove(conn)
        self._limits.counted(len(self.connections) + len(self.preludes))
        if self._config.max_connections_per_ip and isinstance(conn.peer, tuple):
            self._uncount_ip(conn.peer[0])

    def _count_ip(self, peer: object) -> tuple[bool, str | None]:
        """Count ``peer`` against the per-IP limit: whether it is admitted, and the
        address counted (None without a limit to count against)."""
        if not self._config.max_connections_per_ip or not isinstance(peer, tuple):
            return True, None
        ip = str(peer[0])
        if not self._limits.take_ip(ip):
            self._stats.refused_per_ip += 1
            log.debug(
                "refusing %s: %s open from %s",
                format_address(peer),
                plural(self._limits.ip_count(ip), "connection"),
                ip,
            )
            return False, None
        return True, ip

    def _uncount_ip(self, ip: str) -> None:
        self._limits.give_ip(ip)

    def hold(self, prelude: Prelude, per_ip: bool = False) -> bool:
        """Count a connection still in its prelude; False when refused.

        It counts toward ``--max-connections`` (and is swept at shutdown) from
        accept.  The per-IP limit applies now with ``per_ip`` (TLS: the peer is the
        client), else once the real client is known (PROXY: after the header).
        """
        if self._full():
            return False
        admitted, ip = self._count_ip(prelude.peer) if per_ip else (True, None)
        if admitted:
            self.preludes[prelude] = ip
        self._limits.counted(len(self.connections) + len(self.preludes))
        return admitted

    def release(self, prelude: Prelude) -> None:
        """The prelude is over; idempotent (a handshake may end after its transport, and
        a prelude whose connection took its place has nothing left to release)."""
        if prelude not in self.preludes:
            return
        ip = self.preludes.pop(prelude)
        self._limits.counted(len(self.connections) + len(self.preludes))
        if ip:
            self._uncount_ip(ip)

    def proxy_trusted(self, peer: object) -> bool:
        """Whether ``peer`` may (and must) send a PROXY header: in --proxy-allow-from.

        Unix socket peers are local processes and always trusted.
        """
        if not isinstance(peer, tuple):
            return True
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(ip in net for net in self._proxy_networks)
