"""A worker process as the event loop sees it: its pidfd, and the loop's end of its socket.

The socket is registered with the loop itself (``add_reader``), so a batch leaves with
one ``send`` from the loop's thread and a result is read and handed over in the same
callback: no thread, no queue, no wake-up write per task.  Frames are reassembled
here; what they mean is the pool's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import select
import signal
import socket
from collections import deque
from collections.abc import Callable
from multiprocessing.context import ForkServerContext
from typing import Any

from aecho.offload import wire, worker
from aecho.offload.handlers import HandlerError
from aecho.offload.outcomes import PoolError
from aecho.text import printable

STOP_POLL_S = 0.01
READ_SIZE = 64 * 1024  # below malloc's mmap threshold: a larger read maps and unmaps each time

log = logging.getLogger("aecho.offload")

# on_result(worker, data, offset, count, blob, extra, seconds): a RESULT frame, its
# lengths starting at data[offset].  It may raise wire.Malformed.
OnResult = Callable[["Worker", bytes, int, int, int, int, float], None]
# on_lost(worker, why): once ready, the socket reached its end, failed, or carried a
# malformed frame.
OnLost = Callable[["Worker", str], None]


class Worker:
    """One worker process, started through the forkserver, and the loop's end of its socket.

    Until the worker's first byte arrives its pidfd is unknown (``pidfd`` is -1);
    :meth:`kill` then has nothing to go through, and closing the socket is what ends
    the worker.  ``ready`` once it has said whether its handler loads (``since`` then
    says when): until then a loss is reported through ``hello`` (if the pool's start
    waits on it), and after it to ``on_lost``.
    """

    __slots__ = (
        "_chunks",
        "_expect",
        "_fd",
        "_have",
        "_loop",
        "_need",
        "_on_lost",
        "_on_result",
        "_out",
        "_progress",
        "_sent",
        "_sock",
        "hello",
        "pid",
        "pidfd",
        "process",
        "ready",
        "since",
    )

    def __init__(
        self,
        ctx: ForkServerContext,
        loop: asyncio.AbstractEventLoop,
        args: tuple[Any, ...],
        on_result: OnResult,
        on_lost: OnLost,
    ) -> None:
        """Start the process: ``worker.serve(its socket, *args)``.

        Raises:
            OSError: the socket or the process could not be made.
            EOFError: the forkserver went away while starting the process.
        """
        ours, theirs = socket.socketpair()
        try:
            self.process = ctx.Process(
                target=worker.serve, args=(theirs, *args), name="aecho-pool-worker"
            )
            self.process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            # The worker holds the only other copy: its exit is the end of our socket.
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._fd = ours.fileno()
        self._loop = loop
        self._on_result = on_result
        self._on_lost = on_lost
        self._out: list[memoryview] = []
        self._chunks: list[bytes] = []
        self._have = 0  # bytes of an incomplete frame, in _chunks
        self._need = 0  # bytes that frame needs before it can be parsed further
        # Messages in each batch sent and not answered yet: a result must match the first.
        self._expect: deque[int] = deque()
        self._sent = 0  # batches sent
        self._progress: mmap.mmap | None = None  # the worker's progress word, if shared
        self.pid: int | None = self.process.pid
        self.pidfd = -1
        # Set while the pool's start waits for this worker's HELLO.
        self.hello: asyncio.Future[None] | None = None
        self.ready = False
        self.since = loop.time()  # when it was started; once ready, when it became ready
        loop.add_reader(self._fd, self._first_read)

    # -- writing ---------------------------------------------------------------------------

    def send(self, messages: list[bytes]) -> None:
        """Send a batch, keeping what the socket does not take for when it is writable.

        A failed send is not reported here: the peer is gone, and the read side
        reports that.
        """
        self._expect.append(len(messages))
        self._sent += 1
        frame = wire.batch(messages)
        if self._out:
            self._out.append(memoryview(frame))
            return
        try:
            sent = self._sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return
        if sent < len(frame):
            self._out.append(memoryview(frame)[sent:])
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        out = self._out
        while out:
            try:
                sent = self._sock.send(out[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                out.clear()
                break
            if sent < len(out[0]):
                out[0] = out[0][sent:]
                return
            out.pop(0)
        self._loop.remove_writer(self._fd)

    # -- reading ---------------------------------------------------------------------------

    def _first_read(self) -> None:
        """The worker's first byte, carrying its pidfd and its progress word; frames follow."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._sock, 1, 2, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"socket failed: {exc}")
            return
        if fds:
            self.pidfd = fds[0]
            for extra in fds[1:]:
                with contextlib.suppress(OSError, ValueError):
                    self._progress = mmap.mmap(
                        extra, wire.PROGRESS.size, mmap.MAP_SHARED, mmap.PROT_READ
                    )
                os.close(extra)
        if data != b"P":
            self._lost("closed its socket" if not data else f"began with {data!r}")
            return
        self._loop.add_reader(self._fd, self._readable)
        self._readable()  # what came with the first byte (see _readable)

    def _readable(self) -> None:
        """Read until the socket is empty, its end, or an error.

        Not one read per call: uvloop reports a socket error (a worker that exits with a
        batch unread resets its end) by calling the reader once and then no longer
        watching the socket, so what the worker wrote before, and its end, are read now.
        A worker writes only the results it owes, so this ends soon.
        """
        while self._fd >= 0:
            try:
                data = self._sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"socket failed: {exc}")
                return
            if not data:
                self._lost("closed its socket" + (" mid-frame" if self._have else ""))
                return
            if self._have:
                self._chunks.append(data)
                self._have += len(data)
                if self._have < self._need:
                    continue
                data = b"".join(self._chunks)
                self._chunks = []
                self._have = 0
            try:
                self._frames(data)
            except wire.Malformed as exc:
                self._lost(f"sent a malformed frame: {exc}")
                return

    def _frames(self, data: bytes) -> None:
        """Hand over every whole frame in ``data``; keep the rest for the next read.

        Raises:
            wire.Malformed: a header that is not what this worker may send now, or a
                frame that the pool found wrong.
        """
        offset = 0
        end = len(data)
        head = wire.FRAME.size
        while offset < end:
            need = head
            if end - offset >= head:
                kind, count, blob, extra, seconds = wire.FRAME.unpack_from(data, offset)
                # Checked before waiting for the body: garbage claims any size at all.
                if kind == wire.RESULT and self.ready:
                    if not self._expect:
                        raise wire.Malformed("a result when no batch was out")
                    if count != self._expect[0]:
                        raise wire.Malformed(f"{count} replies to {self._expect[0]} messages")
                elif self.ready or kind not in (wire.HELLO, wire.REFUSED):
                    raise wire.Malformed(f"unexpected frame kind {kind}")
                need = wire.frame_size(count, blob, extra)
                if end - offset >= need:
                    if kind == wire.RESULT:
                        self._expect.popleft()
                        self._on_result(self, data, offset + head, count, blob, extra, seconds)
                    else:
                        self._greeted(kind, data[offset + need - extra : offset + need])
                    if self._fd < 0:
                        return  # the pool let this worker go
                    offset += need
                    continue
            self._chunks = [data[offset:]]
            self._have = end - offset
            self._need = need
            return

    def _greeted(self, kind: int, extra: bytes) -> None:
        """The worker's HELLO or REFUSED: whether its handler loads."""
        self.ready = True
        self.since = self._loop.time()
        hello = self.hello if self.hello is not None and not self.hello.done() else None
        if kind == wire.HELLO:
            if hello is not None:
                hello.set_result(None)
            return
        text = extra.decode("utf-8", "replace")
        if hello is not None:
            hello.set_exception(HandlerError(text))
        else:
            log.error(
                "worker %s cannot load the handler, its messages fail: %s",
                self.pid,
                printable(text),
            )

    def _lost(self, why: str) -> None:
        if self._fd < 0:
            return
        if self.hello is not None and not self.hello.done():
            self.hello.set_exception(
                PoolError(f"cannot start worker processes: worker {self.pid} {why}")
            )
            self.close()
            return
        self._on_lost(self, why)

    def running(self) -> int | None:
        """The index, in the oldest batch not answered yet, of the message the worker is
        running (or has just finished); None if unknown: no progress word is shared, or
        the worker has not started that batch yet."""
        progress = self._progress
        if progress is None or not self._expect:
            return None
        index: int
        index, number = wire.PROGRESS.unpack_from(progress)
        oldest = self._sent - len(self._expect) + 1
        if number != oldest & 0xFFFFFFFF or index >= self._expect[0]:
            return None  # NOT_STARTED is no index: a batch holds fewer messages
        return index

    # -- the process -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and close our end: a worker waiting for a batch then exits."""
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        if self._out:
            self._loop.remove_writer(self._fd)
            self._out.clear()
        self._fd = -1
        self._sock.close()

    def kill(self) -> None:
        """SIGKILL the process, the only way to take back a worker stuck in a handler.

        Through the pidfd, so a pid the kernel has since given to another process is
        never signalled.  A worker that never sent its pidfd is ended by :meth:`close`
        and, failing that, exits with the server (see :func:`aecho.offload.worker.init`).
        """
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    @property
    def alive(self) -> bool:
        """Whether the process may still be running."""
        if self.pidfd >= 0:
            return not exited(self.pidfd)
        return self.process.is_alive()

    def release(self) -> None:
        """Close the pidfd and the progress word; the worker is gone or no longer ours."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


def exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (its pidfd polls readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def stop(workers: list[Worker], kill: bool, grace: float) -> bool:
    """Close each worker's socket (a worker waiting for a batch exits on it), SIGKILL
    them all if ``kill``, and wait until they are gone; past ``grace`` seconds SIGKILL
    the rest and return False.  Their pidfds are released either way."""
    for w in workers:
        w.close()
        if kill:
            w.kill()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    gone = True
    while any(w.alive for w in workers):
        if loop.time() >= deadline:
            for w in workers:
                w.kill()
            gone = False
            break
        await asyncio.sleep(STOP_POLL_S)
    for w in workers:
        w.release()
    return gone
