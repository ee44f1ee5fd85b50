"""`fedmed data preprocess`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `preprocess` to the `fedmed data` app."""
