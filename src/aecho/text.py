"""How counts, errors and install hints are written in logs and messages.  Pure: no I/O."""

from __future__ import annotations


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 connection``, ``2 connections``; ``words`` for a plural not made with ``s``."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def printable(text: str) -> str:
    """``text`` with every character that is not printable written as ``repr`` writes it
    (``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\x85``, ``\\u2028``, ...), the rest as it is.

    For text from outside (a peer, a handler's exception, a path, a pidfile) that goes
    into a log record or an error line: it stays one line, and cannot move the cursor
    of the terminal that shows it.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def exception_text(exc: BaseException) -> str:
    """``str(exc)``; a handler's exception whose text raises in turn must not break what
    reports it."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def needs(what: str, package: str, extra: str) -> str:
    """The one line for an option whose optional dependency is missing.

    aecho is installed from a clone, not a package index: the extra is named as a
    clone installs it, and the package for any other environment.
    """
    return (
        f"{what} needs {package}: run pip install -e '.[{extra}]' in aecho's directory "
        f"(or pip install {package})"
    )
