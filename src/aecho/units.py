"""Durations, sizes and rates as a person types them.  Pure: no I/O.

Bare numbers keep their plain meaning (seconds, bytes, per second), so every value
that worked before units existed still works.  Each parser raises ``ValueError``
whose text names the accepted forms, fit to show a user.
"""

from __future__ import annotations

import math
import os
import re

_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z/]*)\s*")

_DURATION = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
# Sizes follow iperf3: k and K are 1024, like KiB; kB and KB (SI) are 1000.
_SIZE = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
# Rates follow wrk2: k is a thousand.
_RATE = {"": 1.0, "k": 1e3, "m": 1e6, "/s": 1.0}

DURATION_FORMS = "seconds, or a number with ms, s, m or h (500ms, 30s, 2m)"
SIZE_FORMS = "bytes, or a number with k/KiB, M/MiB, G/GiB (1024 = 1k = 1KiB; kB = 1000)"
RATE_FORMS = "per second, or a number with k or M (50000 = 50k)"


def _split(text: str) -> tuple[float, str] | None:
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    value = float(m.group(1))
    return (value, m.group(2)) if math.isfinite(value) else None


def parse_duration(text: str) -> float:
    """``"30"``, ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"`` -> seconds.

    Raises:
        ValueError: not a duration.
    """
    parts = _split(text)
    unit = _DURATION.get(parts[1].lower()) if parts else None
    if parts is None or unit is None:
        raise ValueError(f"{text!r} is not a duration: use {DURATION_FORMS}")
    return parts[0] * unit


def parse_size(text: str) -> int:
    """``"64"``, ``"1k"``, ``"1KiB"``, ``"2MiB"``, ``"64kB"`` -> bytes.

    Raises:
        ValueError: not a size, or not a whole number of bytes.
    """
    parts = _split(text)
    unit = _SIZE.get(parts[1].lower()) if parts else None
    if parts is None or unit is None:
        raise ValueError(f"{text!r} is not a size: use {SIZE_FORMS}")
    value = parts[0] * unit
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str) -> float:
    """``"50000"``, ``"50k"``, ``"1.5M"``, ``"200/s"`` -> per second.

    Raises:
        ValueError: not a rate.
    """
    parts = _split(text)
    unit = _RATE.get(parts[1].lower()) if parts else None
    if parts is None or unit is None:
        raise ValueError(f"{text!r} is not a rate: use {RATE_FORMS}")
    return parts[0] * unit


AUTO_WORKERS = -1  # what parse_load_workers makes of "auto", for bench to size


def parse_workers(text: str) -> int:
    """``"4"`` -> 4; ``"auto"`` -> one per CPU.

    Raises:
        ValueError: neither a whole number nor auto.
    """
    if text == "auto":
        return os.cpu_count() or 1
    return parse_load_workers(text)


def parse_load_workers(text: str) -> int:
    """As :func:`parse_workers`, but ``"auto"`` -> :data:`AUTO_WORKERS`: bench runs one
    per CPU, but no more than it has connections.

    Raises:
        ValueError: neither a whole number nor auto.
    """
    if text == "auto":
        return AUTO_WORKERS
    if not text.strip().isdigit():
        raise ValueError(f"{text!r} is not a number of processes: use a whole number or auto")
    return int(text)
