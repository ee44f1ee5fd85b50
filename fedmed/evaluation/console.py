"""Console output of ``fedmed compare``'s tables."""

from __future__ import annotations

from rich.console import Console

LOG_WIDTH = 160
"""Columns of a table printed to a log (not a terminal)."""


def wide(console: Console) -> Console:
    """``console`` on a terminal; else the same file at :data:`LOG_WIDTH` columns.

    Logs (CI, nohup, ``make demo | tee``) default to 80 columns, which truncates every cell
    of a wide table.
    """
    if console.is_terminal:
        return console
    return Console(width=max(console.width, LOG_WIDTH), file=console.file)
