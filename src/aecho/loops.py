"""Event-loop factory: uvloop when available, the stdlib loop otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aecho.config import ConfigError, LoopKind

T = TypeVar("T")


def loop_factory(kind: LoopKind) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a callable that makes a new event loop of the requested kind.

    Raises:
        ConfigError: ``uvloop`` was asked for explicitly and is not installed.
    """
    if kind is LoopKind.asyncio:
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind is LoopKind.uvloop:
            raise ConfigError(
                "--loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: LoopKind = LoopKind.auto) -> T:
    """Run ``main`` to completion on a fresh loop of the given kind."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
