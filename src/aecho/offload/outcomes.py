"""What a pooled message comes back as: its reply, or the exception that stands in for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aecho.offload.handlers import HandlerError

Outcome = bytes | BaseException
# Told where a submission's outcomes are: callback(token, outcomes, start, stop).  The
# list is shared by every submission of a batch; this one's are outcomes[start:stop].
Callback = Callable[[Any, list[Outcome], int, int], None]


class HandlerFailed(Exception):
    """A handler raised in a worker.

    The server rebuilds a subclass of this named like the original exception, so
    the peer's ``ERR ValueError: ...`` line reads the same as with inline processing.
    """


class RemoteTraceback(Exception):
    """The formatted traceback of a handler error in a worker, as the failure's cause.

    Logged with ``exc_info``, the failure then shows where the handler raised, as
    ``concurrent.futures`` shows a worker's traceback.
    """

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class WorkerDied(Exception):
    """The worker process running this message's batch died."""


class HandlerTimeout(Exception):
    """The batch holding this message ran longer than ``--handler-timeout``."""


class PoolClosed(Exception):
    """The server stopped before this message was processed."""


class PoolError(HandlerError):
    """Worker processes could not be started; str() is the user message."""


# Rebuilt exception classes by name, so `ERR ValueError: ...` reads as inline; bounded,
# since names come from user code.
_failure_types: dict[str, type[HandlerFailed]] = {}


def failure(name: str, text: str, trace: str = "") -> HandlerFailed:
    """The exception standing in for a handler's ``name: text`` in a worker.

    ``trace``, the worker's formatted traceback, becomes its cause when given.
    """
    cls = _failure_types.get(name)
    if cls is None:
        cls = type(name, (HandlerFailed,), {"__module__": __name__})
        if len(_failure_types) < 1000:
            _failure_types[name] = cls
    exc = cls(text)
    if trace:
        exc.__cause__ = RemoteTraceback(trace)
    return exc
