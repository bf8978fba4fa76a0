"""Reference echo server: the textbook ``asyncio.start_server`` echo that awaits ``drain()``.

    .venv/bin/python benchmarks/ref_streams.py [PORT] [--loop asyncio|uvloop]

One task per connection, ``StreamReader.read`` / ``StreamWriter.write`` / ``drain``.  It runs
on the stdlib event loop unless ``--loop uvloop`` is given.  Announces
``listening on 127.0.0.1:PORT`` on stderr and READY=1 to ``$NOTIFY_SOCKET``, like
``aecho serve``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aecho.process.systemd import LISTEN_FIELD, notify

READ_SIZE = 64 * 1024


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096)
    host, real_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{real_port}", file=sys.stderr, flush=True)
    notify(f"READY=1\n{LISTEN_FIELD}={host}:{real_port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.port))
    else:
        asyncio.run(main(args.port))
