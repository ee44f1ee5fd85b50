"""`fedmed data synth`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `synth` to the `fedmed data` app."""
