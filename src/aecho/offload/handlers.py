"""Built-in message handlers and loading of ``package.module:function``.

A handler is a top-level function ``bytes -> bytes``.  Top-level, so worker
processes can find it by name.  No asyncio here.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import time
from collections.abc import Callable

Handler = Callable[[bytes], bytes]

# What a handler may raise that costs its message and nothing more: any Exception, and
# the two that ask a program to end, which a handler may not ask of the server (argparse
# raises SystemExit on input it refuses).  Workers ignore SIGINT and the server takes it
# through its loop, so a KeyboardInterrupt in a handler is always the handler's own.
HANDLER_FAILURES = (Exception, SystemExit, KeyboardInterrupt)


def as_bytes(reply: object) -> bytes:
    """A handler's reply that is not ``bytes``, as bytes.

    Raises:
        TypeError: it is not bytes-like.
    """
    if isinstance(reply, bytes | bytearray | memoryview):
        return bytes(reply)
    raise TypeError(f"handler returned {type(reply).__name__}, not bytes")


class HandlerError(ValueError):
    """A handler name could not be resolved; str() is the user message."""


def echo(data: bytes) -> bytes:
    return data


def upper(data: bytes) -> bytes:
    return data.upper()


def reverse(data: bytes) -> bytes:
    return data[::-1]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode("ascii")


BURN_SECONDS = 0.001


def burn(data: bytes) -> bytes:
    """Return ``data`` after about 1 ms of CPU work (a stand-in for a costly handler)."""
    deadline = time.thread_time() + BURN_SECONDS
    x = 0
    while time.thread_time() < deadline:
        for i in range(200):
            x ^= i * i
    return data


BUILTINS: dict[str, Handler] = {
    "echo": echo,
    "upper": upper,
    "reverse": reverse,
    "sha256": sha256,
    "burn": burn,
}


def load_handler(name: str, directory: str | None = None) -> Handler:
    """Resolve a built-in name or ``package.module:function``.

    A module is looked for in ``directory`` (default: the working directory) first,
    then on the rest of ``sys.path`` (PYTHONPATH, the installed packages), as
    ``python -m``, uvicorn and gunicorn do: ``directory`` stays at the front of
    ``sys.path``, so the handler's own imports of its neighbours work too.

    Raises:
        HandlerError: unknown name, import failure, missing attribute, or not callable.
    """
    if name in BUILTINS:
        return BUILTINS[name]
    if ":" not in name:
        known = ", ".join(BUILTINS)
        raise HandlerError(
            f"unknown handler {name!r}: use one of {known}, or package.module:function"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise HandlerError(f"bad handler {name!r}: expected package.module:function")
    where = _search_first(directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not _is_part_of(exc.name, module_name):
            raise HandlerError(
                f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        raise HandlerError(
            f"cannot import handler module {module_name!r}: no module named {exc.name!r} "
            f"in {where} (the working directory), on PYTHONPATH or among the installed packages"
        ) from exc
    except Exception as exc:  # any import-time failure is the user's handler's fault
        raise HandlerError(
            f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(
                f"handler {name!r}: module {module_name!r} has no {attr!r}"
            ) from None
    if not callable(obj):
        raise HandlerError(f"handler {name!r} is not callable")
    return obj


def _search_first(directory: str | None) -> str:
    """Put ``directory`` (default: the working directory) at the front of ``sys.path``."""
    try:
        where = os.path.abspath(directory or os.getcwd())
    except OSError:  # the working directory was removed
        return directory or "."
    if where not in sys.path:
        sys.path.insert(0, where)
    return where


def _is_part_of(missing: str, module_name: str) -> bool:
    """Whether the module found missing is ``module_name`` or a package on its way."""
    return module_name == missing or module_name.startswith(missing + ".")
