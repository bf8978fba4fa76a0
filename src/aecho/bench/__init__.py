"""``aecho bench``: a verifying TCP echo load tester.

Never imports :mod:`aecho.server`: with no HOST/PORT it starts ``aecho serve`` as a
subprocess and measures that.
"""

from __future__ import annotations

import sys
from dataclasses import replace

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
    progress = report.Progress(cfg) if not cfg.json and sys.stderr.isatty() else None
    on_progress = progress.update if progress is not None else None
    try:
        if cfg.embedded:
            with engine.embedded_server(cfg) as (host, port):
                result = engine.run(replace(cfg, host=host, port=port), on_progress)
        else:
            result = engine.run(cfg, on_progress)
    finally:
        if progress is not None:
            progress.stop()
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
