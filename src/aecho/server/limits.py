"""Connection limits: ``--max-connections`` and ``--max-connections-per-ip``.

One serving process keeps them in plain counters.  Under ``--workers N`` they hold
for the server as a whole: each serving process writes its own counts into a
table in shared memory (made by the supervisor before it forks, so every serving
process maps the same pages) and reads the others' before admitting a connection.
No locks: a process only ever writes its own row, and it counts a connection
before it reads the total (and takes the count back if that passes the limit).  Two
processes admitting at the same instant can then both refuse, rarely, but never both
admit past the limit: check first and count after, each could see room for the same
last place, and the connections admitted past it would stay open.

Per client address the shared table keeps a count-min sketch (two rows of hashed
counters per process): an address's count is the smaller of its two counters,
summed over processes.  Collisions can only make a count too high, never too low,
so the limit is never exceeded; an address that shares both counters with a busy
one may be refused early (with 4,096 counters a row, rarely).
"""

from __future__ import annotations

import mmap
import zlib

SKETCH_WIDTH = 4096
SKETCH_ROWS = 2
_SALTS = (0, 0x9E3779B9)


class Limits:
    """The limits of one serving process on its own."""

    def __init__(self, max_connections: int, per_ip: int) -> None:
        self.max_connections = max_connections
        self.per_ip = per_ip
        self._per_ip: dict[str, int] = {}

    def full(self, open_here: int) -> bool:
        """Whether one more connection would pass --max-connections."""
        return open_here >= self.max_connections

    def counted(self, open_here: int) -> None:
        """This process now has ``open_here`` connections (admitted or held); called after
        every :meth:`full` that returned False, whether the connection was admitted."""

    def ip_count(self, ip: str) -> int:
        """Connections from ``ip`` now."""
        return self._per_ip.get(ip, 0)

    def take_ip(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (and nothing counted) at its limit."""
        count = self._per_ip.get(ip, 0)
        if count >= self.per_ip:
            return False
        self._per_ip[ip] = count + 1
        return True

    def give_ip(self, ip: str) -> None:
        count = self._per_ip.get(ip, 0) - 1
        if count > 0:
            self._per_ip[ip] = count
        else:
            self._per_ip.pop(ip, None)


class SharedTable:
    """Per-process rows of counts in an anonymous shared mapping (see the module docstring).

    Row ``slot`` belongs to one serving process at a time; the supervisor clears a
    row before giving it to a new process.
    """

    def __init__(self, slots: int, sketch: bool) -> None:
        self.slots = slots
        self.sketch = sketch
        cells = SKETCH_ROWS * SKETCH_WIDTH if sketch else 0
        self._open_bytes = 8 * slots
        self._mm = mmap.mmap(-1, self._open_bytes + 4 * cells * slots)
        self._open = memoryview(self._mm)[: self._open_bytes].cast("q")
        self._cells = cells
        self._sketch = memoryview(self._mm)[self._open_bytes :].cast("i") if sketch else None

    def clear(self, slot: int) -> None:
        self._open[slot] = 0
        if self._sketch is not None:
            start = slot * self._cells
            self._sketch[start : start + self._cells] = memoryview(bytes(4 * self._cells)).cast("i")

    def open_total(self) -> int:
        return sum(self._open)

    def set_open(self, slot: int, n: int) -> None:
        self._open[slot] = n

    def _cells_of(self, ip: str) -> list[int]:
        key = ip.encode()
        return [
            row * SKETCH_WIDTH + zlib.crc32(key, salt) % SKETCH_WIDTH
            for row, salt in enumerate(_SALTS)
        ]

    def ip_count(self, ip: str) -> int:
        """Connections from ``ip`` across every process (never too low; see the module)."""
        sketch = self._sketch
        assert sketch is not None
        cells = self._cells_of(ip)
        return min(
            sum(sketch[slot * self._cells + cell] for slot in range(self.slots)) for cell in cells
        )

    def ip_add(self, slot: int, ip: str, delta: int) -> None:
        sketch = self._sketch
        assert sketch is not None
        base = slot * self._cells
        for cell in self._cells_of(ip):
            sketch[base + cell] += delta


class SharedLimits(Limits):
    """The limits of one serving process among several: counts in a :class:`SharedTable`."""

    def __init__(self, max_connections: int, per_ip: int, table: SharedTable, slot: int) -> None:
        super().__init__(max_connections, per_ip)
        self.table = table
        self.slot = slot

    def full(self, open_here: int) -> bool:
        # Counted before the total is read (see the module docstring); the caller's
        # next counted() sets the row to what it really holds.
        table = self.table
        table.set_open(self.slot, open_here + 1)
        if table.open_total() > self.max_connections:
            table.set_open(self.slot, open_here)
            return True
        return False

    def counted(self, open_here: int) -> None:
        self.table.set_open(self.slot, open_here)

    def ip_count(self, ip: str) -> int:
        return self.table.ip_count(ip)

    def take_ip(self, ip: str) -> bool:
        table = self.table
        table.ip_add(self.slot, ip, 1)
        if table.ip_count(ip) > self.per_ip:
            table.ip_add(self.slot, ip, -1)
            return False
        return True

    def give_ip(self, ip: str) -> None:
        self.table.ip_add(self.slot, ip, -1)
