"""The one exception of ``aecho bench`` as a whole."""

from __future__ import annotations

from typing import Any


class BenchError(RuntimeError):
    """The bench cannot run or went wrong as a whole; str() is the one-line message.

    ``partial`` is what was measured before it went wrong (a worker's result), if anything.
    """

    def __init__(self, message: str, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial
