"""The worker pool alone, without sockets to peers: what a task costs.

    .venv/bin/python benchmarks/pool_alone.py [--seconds 2]
    PYTHONPATH=OTHER/src .venv/bin/python benchmarks/pool_alone.py    # another tree's pool

One worker, the echo handler, 64-byte messages, driven from the pool's own event loop:
one-message tasks one after another (a round trip each), then batches of 16 and of 128,
two submitted at a time.  Reported: messages per second for each.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from aecho.offload.pool import Pool

MESSAGE = b"x" * 64


class _Latency:
    def observe(self, seconds: float, n: int = 1) -> None:
        pass


class _Counters:
    messages = 0
    pool_restarts = 0
    offload_latency = _Latency()


def _done(future: asyncio.Future[None]) -> Any:
    return lambda token, outcomes, start, stop: future.done() or future.set_result(None)


async def run(seconds: float) -> None:
    pool = Pool("echo", 1, 10.0, _Counters())
    await pool.start()
    loop = asyncio.get_running_loop()
    try:
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            future = loop.create_future()
            pool.submit_one(MESSAGE, _done(future), 0)
            await future
            n += 1
        rate = n / (time.perf_counter() - started)
        print(f"{'one-message tasks in turn':26} {rate:9.0f} msgs/s")
        for size in (16, 128):
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                futures = []
                for _ in range(2):
                    futures.append(loop.create_future())
                    pool.submit_to([MESSAGE] * size, _done(futures[-1]), 0)
                    await asyncio.sleep(0)  # a flush each
                await asyncio.gather(*futures)
                n += 2 * size
            rate = n / (time.perf_counter() - started)
            print(f"{f'batches of {size}':26} {rate:9.0f} msgs/s")
    finally:
        await pool.close(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    asyncio.run(run(parser.parse_args().seconds))


if __name__ == "__main__":
    main()
