"""How counts are written in logs and messages.  Pure: no I/O."""

from __future__ import annotations


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 connection``, ``2 connections``; ``words`` for a plural not made with ``s``."""
    return f"{count} {word if count == 1 else (words or word + 's')}"
