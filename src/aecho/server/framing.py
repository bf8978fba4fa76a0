"""Sans-IO framers: bytes in, messages out.  No asyncio here.

A framer turns a stream of arbitrarily chunked bytes into messages.  ``raw``
treats each chunk as a message (an echo needs no boundaries); ``line`` yields
each ``\\n``-terminated line without its terminator.
"""

from __future__ import annotations

from typing import Protocol


class FrameError(Exception):
    """The peer broke the framing rules; str() is the reason sent back to it.

    ``messages`` holds the complete messages that came before the violation: they
    were sent in good faith and still deserve their replies.
    """

    def __init__(self, reason: str, messages: list[bytes] | None = None) -> None:
        super().__init__(reason)
        self.messages = messages or []


class Framer(Protocol):
    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data`` and return the complete messages it finished.

        Raises:
            FrameError: the input violates a limit; the framer is unusable afterwards.
        """
        ...

    def encode(self, reply: bytes) -> bytes:
        """Turn a handler's reply into the bytes to write back."""
        ...


class RawFramer:
    """Every chunk is a message; replies go back as they are."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[bytes]:
        return [data] if data else []

    def encode(self, reply: bytes) -> bytes:
        return reply


class LineFramer:
    """``\\n``-terminated lines of at most ``max_line`` bytes (terminator excluded).

    An unfinished line waits in a ``bytearray``: a long line arriving in small
    pieces costs linear time, not a new bytes object per piece.
    """

    __slots__ = ("_buf", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._buf += data
            if len(self._buf) > self.max_line:
                self._refuse([])
            return []
        if self._buf:
            self._buf += data
            *lines, rest = bytes(self._buf).split(b"\n")
            self._buf.clear()
        else:
            *lines, rest = data.split(b"\n")
        self._buf += rest
        # One pass in C over the lengths; the offender is looked for only when there is one
        # (a read of tiny lines holds a hundred thousand of them).
        if lines and max(map(len, lines)) > self.max_line:
            first = next(i for i, line in enumerate(lines) if len(line) > self.max_line)
            self._refuse(lines[:first])
        if len(rest) > self.max_line:
            self._refuse(lines)
        return lines

    def _refuse(self, before: list[bytes]) -> None:
        self._buf.clear()
        raise FrameError(f"line too long: limit is {self.max_line} bytes", before)

    def encode(self, reply: bytes) -> bytes:
        return reply + b"\n"

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held back."""
        return len(self._buf)
