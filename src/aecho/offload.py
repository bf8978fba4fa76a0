"""Processors: where a handler runs.  Knows nothing of sockets.

``InlineProcessor`` calls the handler on the event loop, synchronously; the
connection uses its ``handler`` directly on the hot path.  A pooled processor
(``inline = False``) takes batches with :meth:`Processor.submit` and resolves a
future with one outcome per message: the reply bytes, or the exception that
stood in for it.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from aecho.handlers import Handler
from aecho.stats import Stats

Outcome = bytes | BaseException


class Processor:
    """Interface every processor implements."""

    inline: ClassVar[bool] = True

    def __init__(self, handler: Handler, handler_name: str = "echo") -> None:
        self.handler = handler
        self.handler_name = handler_name
        # The server hands over its counters (handler errors, pool restarts, latency).
        self.stats = Stats()

    async def start(self) -> None:
        """Acquire resources (worker processes); called once, inside the running loop."""

    def submit(self, messages: list[bytes]) -> asyncio.Future[list[Outcome]]:
        """Queue ``messages``; the future resolves to one outcome per message, in order."""
        raise NotImplementedError

    async def close(self, timeout: float) -> None:
        """Finish or abandon outstanding work within ``timeout`` seconds and release resources."""


class InlineProcessor(Processor):
    """Runs the handler on the event loop, in the connection's own call."""

    inline = True
