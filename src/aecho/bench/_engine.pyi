"""Types of the compiled per-message loop (src/aecho/bench/_engine.c)."""

from collections.abc import Sequence

EOF: int
ERROR: int
MISMATCH: int
TIMEOUT: int

def bucket(value: int, sub_bits: int, /) -> int: ...

class Engine:
    def __init__(
        self,
        fds: Sequence[int],
        templates: Sequence[bytes],
        hex_at: int,
        capacity: int,
        sub_bits: int,
        highest_ns: int,
        buckets: int,
    ) -> None: ...
    def load(self, i: int, seq: int, off: int, dues: Sequence[int], /) -> None: ...
    def run(
        self, until_ns: int, measure_ns: int, timeout_ns: int, /
    ) -> tuple[bool, list[tuple[int, int, int]]]: ...
    def take(self) -> tuple[dict[int, int], int, int, int]: ...
    def state(self, i: int, /) -> tuple[int, int, list[int], int, int]: ...
    def release(self, i: int, /) -> None: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...
