"""``aecho bench``: a verifying TCP echo load tester.

Never imports :mod:`aecho.server`: with no HOST/PORT it starts ``aecho serve`` as a
subprocess and measures that.  :func:`main` is what the command line calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aecho.config import BenchConfig


def main(cfg: BenchConfig) -> int:
    """Run the bench (or its search) and report; the exit status (see runner.main).

    Raises:
        aecho.bench.errors.BenchError: nothing could be measured (one-line reason).
        aecho.config.ConfigError: the options cannot be honoured.
        aecho.offload.handlers.HandlerError: --handler cannot be loaded.
    """
    from aecho.bench.runner import main as run  # here: importing the package stays cheap

    return run(cfg)


def merge(paths: list[str], as_json: bool, plot: str | None = None) -> int:
    """``aecho bench merge``: print the combined result of ``--json`` files; the exit
    status (1 if the runs saw errors).

    Raises:
        aecho.bench.errors.BenchError: a file cannot be read, or the files measured
            different things.
    """
    from aecho.bench.reading import merge_main

    return merge_main(paths, as_json, plot)
