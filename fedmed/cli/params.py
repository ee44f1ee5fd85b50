"""Parameter types of the CLI's numeric options, validated when the command line is parsed.

``typer.Option(min=..., max=...)`` covers integer ranges; a float option needs more, since
click's ``FloatRange`` lets ``nan`` through (every comparison with NaN is false) and has no
"strictly positive" without ``min_open``. A bad value is a usage error (exit 2) whose
message names the option, before any file is read.
"""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """A float in a range that is also finite (``nan`` and ``inf`` are refused)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The value as a float, refused (usage error) outside the range or when not finite."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def positive_float() -> FiniteFloatRange:
    """A finite float strictly greater than 0."""
    return FiniteFloatRange(min=0.0, min_open=True)
