"""How every ``aecho`` command behaves on the command line, whatever it does.

- Errors are one line on stderr with one prefix, ``aecho: error: ...``.  Usage errors
  (exit 2) end with ``(see 'aecho CMD --help')``; runtime failures (exit 1) say what
  to do instead.  Text from the validation library under typer ("Input should be a
  valid integer", "Value error, ...") is rewritten into the same plain words.
- ``aecho`` alone is a usage error like any other: the help goes to stderr, exit 2
  (click 8.2 and argparse do the same; a script that lost its subcommand must fail).
- Help is plain text: typer reads help strings as Rich markup, which silently drops
  anything in square brackets.  Flags show no value type, since they take none.
- Units: ``**DURATION``, ``**SIZE`` and ``**RATE`` make an option take ``30s``,
  ``1KiB`` or ``50k`` (see :mod:`aecho.units`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import rich.markup
import typer
import typer.core

from aecho import __version__
from aecho.text import printable
from aecho.units import parse_duration, parse_load_workers, parse_rate, parse_size, parse_workers

PREFIX = "aecho: error: "


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``aecho: error: MESSAGE`` on stderr and exit with ``code``.

    A usage error (``code`` 2) also names the command's ``--help``.

    Raises:
        typer.BadParameter: for code 2, printed by :class:`Group`.
        typer.Exit: otherwise, after printing.
    """
    if code == 2:
        raise typer.BadParameter(message)
    typer.echo(PREFIX + printable(message), err=True)  # one line, whatever it quotes
    raise typer.Exit(code)


def version_line() -> str:
    """``aecho VERSION (PYTHON VERSION, uvloop VERSION, SYSTEM)``: what a bug report needs."""
    parts = [f"{platform.python_implementation()} {platform.python_version()}"]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        parts.append(f"uvloop {importlib.metadata.version('uvloop')}")
    parts.append(f"{platform.system()} {platform.machine()}")
    return f"aecho {__version__} ({', '.join(parts)})"


def show_version(value: bool) -> None:
    """The ``--version`` callback.

    Raises:
        typer.Exit: after printing the version, when asked for it.
    """
    if value:
        typer.echo(version_line())
        raise typer.Exit(0)


# -- units ------------------------------------------------------------------------------------


def _units(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A typer ``parser`` from a units parser: its ValueError becomes a usage error."""

    def parser(value: str) -> Any:
        if not isinstance(value, str):  # a default, already parsed
            return value
        try:
            return parse(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parser


DURATION: dict[str, Any] = {"parser": _units(parse_duration), "metavar": "DURATION"}
SIZE: dict[str, Any] = {"parser": _units(parse_size), "metavar": "SIZE"}
RATE: dict[str, Any] = {"parser": _units(parse_rate), "metavar": "RATE"}
WORKERS: dict[str, Any] = {"parser": _units(parse_workers), "metavar": "N|auto"}
LOAD_WORKERS: dict[str, Any] = {"parser": _units(parse_load_workers), "metavar": "N|auto"}


# -- usage errors in one line -----------------------------------------------------------------


def _param_name(param: Any) -> str:
    """``-p/--port`` for an option, ``PORT`` for an argument."""
    if getattr(param, "param_type_name", "") == "argument":
        return str(param.metavar or param.name or "argument").upper()
    return "/".join(param.opts)


def _reason(exc: typer.BadParameter) -> str:
    """Why a value was refused, in plain words even when a validation library said it."""
    errors = getattr(exc.__cause__, "errors", None)
    if not callable(errors):
        return str(exc.message)
    found = errors()
    if not found:
        return str(exc.message)
    first = found[0]
    kind, value, ctx = first.get("type"), first.get("input"), first.get("ctx") or {}
    if kind == "int_parsing":
        return f"{value!r} is not a whole number"
    if kind == "float_parsing":
        return f"{value!r} is not a number"
    if kind == "less_than_equal":
        return f"{value} is more than {ctx['le']}"
    if kind == "greater_than_equal":
        return f"{value} is less than {ctx['ge']}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(first.get("msg", exc.message))


def one_line(exc: typer.TyperException) -> str:
    """The text of a usage error, fit to follow ``aecho: error: ``."""
    param = getattr(exc, "param", None)
    text = exc.format_message()
    if isinstance(exc, typer.BadParameter) and text.startswith("Invalid value"):
        if param is not None:
            text = f"invalid value for {_param_name(param)}: {_reason(exc)}"
        elif exc.param_hint is None:  # raised by fail(): the message is the whole story
            text = exc.message
    elif text[1:2].islower():  # "No such option" -> "no such option"; acronyms keep case
        text = text[0].lower() + text[1:]
    return text.rstrip(".")


# -- help and errors for every command --------------------------------------------------------


class _Conventions:
    """Plain-text help; flags without a value type."""

    params: list[Any]
    help: str | None

    def _plain_help(self) -> None:
        if self.help:
            self.help = rich.markup.escape(self.help)
        for param in self.params:
            if getattr(param, "help", None):
                param.help = rich.markup.escape(param.help)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            rv: list[str] = super().parse_args(ctx, args)  # type: ignore[misc]
        except typer.TyperException as exc:
            # The option parser raises without a context, and the group would add its
            # own: `--daemon=yes` would then point at `aecho --help`, not `aecho serve --help`.
            if getattr(exc, "ctx", False) is None:
                exc.ctx = ctx  # type: ignore[attr-defined]
            raise
        return rv

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            # Typer's help panel shows a type for every option, so `--daemon <bool>`
            # would suggest a value the flag refuses; an empty metavar shows none.
            if (getattr(param, "is_flag", False) or getattr(param, "count", False)) and (
                param.metavar is None
            ):
                param.metavar = ""
        return params


class Command(_Conventions, typer.core.TyperCommand):
    """Every ``aecho`` subcommand: ``@app.command(cls=Command)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_help()


class Group(_Conventions, typer.core.TyperGroup):
    """The ``aecho`` group: usage errors as one line (``aecho: error: ...``) and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_help()

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # Rich prints the help to stdout as it renders it; this is an error exit.
            with contextlib.redirect_stdout(sys.stderr):
                text = ctx.get_help()
            if text:  # without Rich the help comes back as text
                typer.echo(text, err=True)
            ctx.exit(2)
        rv: list[str] = super().parse_args(ctx, args)
        return rv

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else (prog_name or "aecho")
            code = getattr(exc, "exit_code", 1)
            hint = f" (see '{where} --help')" if code == 2 else ""
            typer.echo(f"{PREFIX}{one_line(exc)}{hint}", err=True)
            rv = code
        except typer.Abort:
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
