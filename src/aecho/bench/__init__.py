"""``aecho bench``: a verifying TCP echo load tester.

Never imports :mod:`aecho.server`: with no HOST/PORT it starts ``aecho serve`` as a
subprocess and measures that.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aecho.config import BenchConfig


def main(cfg: BenchConfig) -> int:
    """Run the bench and report; return the exit status (0 ok, 1 failed).

    Raises:
        aecho.bench.engine.BenchError: nothing could be measured (one-line reason).
        aecho.config.ConfigError: the options cannot be honoured.
        aecho.handlers.HandlerError: --handler cannot be loaded.
    """
    from aecho.bench import engine, report

    if cfg.plot:
        report.check_plot()
    engine.reply_function(cfg)
    # SIGTERM ends a run like Ctrl-C does, so the embedded server is still stopped.
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.signal(signal.SIGTERM, _interrupt)
    progress = report.Progress(cfg) if not cfg.json and sys.stderr.isatty() else None
    on_progress = progress.update if progress is not None else _announce(cfg)
    try:
        if cfg.embedded:
            with engine.embedded_server(cfg) as (host, port, pid):
                result = engine.run(replace(cfg, host=host, port=port), on_progress)
            result.server_pid = pid
        else:
            result = engine.run(cfg, on_progress)
    finally:
        if progress is not None:
            progress.stop()
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)
    if cfg.json:
        report.print_json(result)
    else:
        report.print_table(result)
    if cfg.plot:
        report.write_plot(result, cfg.plot)
    failures = report.verdict(result)
    for line in failures:
        print(f"aecho bench: {line}", file=sys.stderr)
    return 1 if failures else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _announce(cfg: BenchConfig) -> Callable[[dict[str, Any]], None]:
    """Without a terminal, one line on stderr once the connections are up and load starts."""
    said = False

    def on_progress(_: dict[str, Any]) -> None:
        nonlocal said
        if not said:
            said = True
            what = f"{cfg.duration:g} s" if cfg.duration is not None else f"{cfg.messages} messages"
            print(
                f"aecho bench: measuring with {cfg.connections} connections for {what}",
                file=sys.stderr,
                flush=True,
            )

    return on_progress
