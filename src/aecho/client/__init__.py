"""``aecho client``: interactive on a terminal, a byte-exact pipe otherwise.

Plain sockets, no event loop: one peer, no concurrency worth one.
"""

from __future__ import annotations

import sys

from aecho.client.connection import ClientError, OutputClosed
from aecho.client.interactive import run_interactive
from aecho.client.pipe import run_pipe
from aecho.config import ClientConfig

__all__ = ["ClientError", "OutputClosed", "run"]


def run(config: ClientConfig) -> None:
    """Interactive on a terminal, pipe mode otherwise.

    Raises:
        ClientError: connecting failed, the connection broke, or the server fell silent.
        OutputClosed: stdout was closed by its reader.
        aecho.config.ConfigError: ``--cafile`` cannot be loaded.
    """
    if sys.stdin.isatty():
        run_interactive(config)
    else:
        run_pipe(config, sys.stdin.buffer, sys.stdout.buffer)
