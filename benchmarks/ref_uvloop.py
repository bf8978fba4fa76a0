"""Reference echo server: a minimal uvloop ``BufferedProtocol`` echo.

    python benchmarks/ref_uvloop.py [PORT]

The loop reads straight into one preallocated buffer shared by every connection (safe: one
thread, and ``buffer_updated`` copies the bytes out before the next read), and each read is
written back at once.  No limits, no idle tracking, no backpressure: the floor that aecho's
features must not measurably rise above.  Announces ``listening on 127.0.0.1:PORT`` on
stderr; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

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


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
    host, real_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{real_port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=0)
    uvloop.run(main(parser.parse_args().port))
