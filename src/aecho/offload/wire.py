"""What crosses a worker's socket: length-prefixed frames, read and written by both ends.

A batch is one header, the messages' lengths as a machine-int array, and the messages
back to back, so neither end pickles anything per message and the pool sends a task
with one system call.  A worker answers each batch, in order, with a result frame of
the same shape; the pool checks everything a frame claims against the batch it sent,
so a worker that writes anything else is caught rather than believed.

Worker to pool, in order of a worker's life:

1. one byte carrying the worker's pidfd (``SCM_RIGHTS``; no fd where the kernel has no
   pidfds), so the pool signals that process and never a pid the kernel may have
   given to another since, and after it a memfd of ``PROGRESS`` (none where there is
   no memfd): the worker writes there the number of the batch it starts (from 1, in
   the order they were sent; the index ``NOT_STARTED`` first), and the index of each
   message before it runs it;
2. ``HELLO`` (all fields zero) once the handler resolved, or ``REFUSED``
   (extra: the handler error's message) if it did not;
3. one ``RESULT`` per batch: the replies (a failed message's reply is empty), the
   seconds spent, and as extra the failures, JSON ``[[index, name, text, traceback],
   ...]``: text only, never an exception object, since one that the worker can
   pickle the server may not be able to rebuild.

The pool closing its end of the socket is a worker's signal to exit.
"""

from __future__ import annotations

import array
import json
import struct

BATCH = struct.Struct("<IQ")  # messages, blob bytes
FRAME = struct.Struct("<BIQId")  # kind, count, blob bytes, extra bytes, seconds
HELLO, REFUSED, RESULT = 1, 2, 3
LENGTH = array.array("I").itemsize
PROGRESS = struct.Struct("=II")  # index in the batch, batch number (mod 2**32)
NOT_STARTED = 0xFFFFFFFF

Failures = dict[int, tuple[str, str, str]]


class Malformed(ValueError):
    """A frame that contradicts itself or the batch it answers."""


def batch(messages: list[bytes]) -> bytes:
    """One batch frame: header, lengths, messages."""
    lengths = array.array("I", map(len, messages))
    return b"".join([BATCH.pack(len(messages), sum(lengths)), lengths, *messages])


def result(replies: list[bytes], failures: Failures, seconds: float) -> bytes:
    """One result frame: header, lengths, replies, failures."""
    lengths = array.array("I", map(len, replies))
    extra = json.dumps([[i, *f] for i, f in failures.items()]).encode() if failures else b""
    head = FRAME.pack(RESULT, len(replies), sum(lengths), len(extra), seconds)
    return b"".join([head, lengths, *replies, extra])


def hello() -> bytes:
    return FRAME.pack(HELLO, 0, 0, 0, 0.0)


def refused(message: str) -> bytes:
    text = message.encode("utf-8", "replace")
    return FRAME.pack(REFUSED, 0, 0, len(text), 0.0) + text


def frame_size(count: int, blob: int, extra: int) -> int:
    """Bytes of a worker's frame, header included, from its header's fields."""
    return FRAME.size + LENGTH * count + blob + extra


def split(data: bytes, offset: int, count: int, blob: int) -> list[bytes]:
    """The ``count`` messages of ``blob`` bytes whose lengths start at ``data[offset]``.

    Raises:
        Malformed: the lengths do not add up to ``blob``.
    """
    start = offset + LENGTH * count
    lengths = array.array("I")
    lengths.frombytes(data[offset:start])
    if sum(lengths) != blob:
        raise Malformed(f"lengths add up to {sum(lengths)} bytes, not {blob}")
    out: list[bytes] = []
    append = out.append
    for n in lengths:
        end = start + n
        append(data[start:end])
        start = end
    return out


def parse(
    data: bytes, offset: int, count: int, blob: int, extra: int
) -> tuple[list[bytes], Failures | None]:
    """A result's replies and failures (None: none failed); its lengths start at ``offset``.

    Raises:
        Malformed: the lengths or the failures do not hold.
    """
    replies = split(data, offset, count, blob)
    if not extra:
        return replies, None
    at = offset + LENGTH * count + blob
    return replies, failures(data[at : at + extra], count)


def failures(raw: bytes, count: int) -> Failures:
    """Failures from a result's extra bytes, for a batch of ``count`` messages.

    Raises:
        Malformed: not the JSON a worker writes, or an index outside the batch.
    """
    try:
        entries = json.loads(raw)
        out: Failures = {}
        for index, name, text, trace in entries:
            if not (type(index) is int and 0 <= index < count):
                raise Malformed(f"failure index {index!r} outside a batch of {count}")
            out[index] = (str(name), str(text), str(trace))
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError and Malformed included
        raise Malformed(f"unreadable failures: {exc}") from exc
    return out
