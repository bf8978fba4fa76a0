"""Reference echo server: a minimal uvloop ``BufferedProtocol`` echo.

    .venv/bin/python benchmarks/ref_uvloop.py [PORT] [--plain]

The loop reads straight into one preallocated buffer shared by every connection (safe: one
thread, and ``buffer_updated`` copies the bytes out before the next read), and each read is
written back at once.  No limits, no idle tracking, no backpressure: the floor that aecho's
features must not measurably rise above.  ``--plain`` serves a plain ``Protocol`` echo
instead (``data_received`` -> ``write``), the shape aecho's default path has.  Announces
``listening on 127.0.0.1:PORT`` on stderr and READY=1 to ``$NOTIFY_SOCKET``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from aecho.process.systemd import LISTEN_FIELD, notify

BUFFER = bytearray(256 * 1024)
VIEW = memoryview(BUFFER)


class Echo(asyncio.BufferedProtocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return VIEW

    def buffer_updated(self, nbytes: int) -> None:
        # A copy: the transport may queue what it cannot send now, and VIEW is reused.
        self.transport.write(VIEW[:nbytes].tobytes())

    def eof_received(self) -> bool:
        return False


class PlainEcho(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


async def main(port: int, plain: bool) -> None:
    loop = asyncio.get_running_loop()
    factory = PlainEcho if plain else Echo
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=4096)
    host, real_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{real_port}", file=sys.stderr, flush=True)
    notify(f"READY=1\n{LISTEN_FIELD}={host}:{real_port}")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="a plain Protocol echo")
    args = parser.parse_args()
    uvloop.run(main(args.port, args.plain))
