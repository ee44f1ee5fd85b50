"""What every benchmark returns, and the machine it ran on.

Each ``benchmarks/bench_*.py`` exposes ``run(quick: bool = False) -> list[Figure]``;
``benchmarks/run_all.py`` calls them all and writes ``docs/benchmarks.md``. A figure is a
ratio measured side by side in one run, or a count (bytes, sites, memory): never a lone
wall-clock time.
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """One measured figure against its target."""

    benchmark: str
    name: str
    value: float
    unit: str
    target: str
    met: bool | None
    """``None``: no target (informational) or skipped."""
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def machine() -> dict[str, Any]:
    """Cores, memory, GPU (as in the comparison report), Python/torch versions and the date."""
    import torch

    from fedmed.evaluation.compare import machine_description

    return {
        **machine_description(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.date.today().isoformat(),
    }
