"""``fedmed centralized`` and ``fedmed local``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fedmed.cli.tracking_opts import MlflowUriOpt, TrackingOpt, apply_tracking

ConfigOpt = typer.Option(..., "--config", "-c", help="Federation config (YAML).", exists=False)
OutOpt = typer.Option(..., "--out", "-o", help="Run directory to create.")


def _summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("evaluated on")
    table.add_column("Dice (mean)", justify="right")
    classes = list(summary["dice_per_class"])
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("HD95 mm", justify="right")

    def row(name: str, m: dict) -> None:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        table.add_row(
            name,
            f(m["dice_mean"]),
            *[f(m["dice_per_class"].get(c)) for c in classes],
            "-" if m["hd95_mean"] is None else f"{m['hd95_mean']:.1f}",
        )

    row("central test", summary["central"])
    for site, m in summary.get("per_site", {}).items():
        row(f"site {site} (test)", m)
    for site, m in summary.get("unseen", {}).items():
        row(f"unseen {site}", m)
    return table


EpochsOpt = typer.Option(None, min=1, help="Override training.epochs.")
ForceOpt = typer.Option(False, help="Replace an existing run directory.")


def _pooled(config: Path, out: Path, sites: list[str] | None, title: str, **options: Any) -> None:
    """Train one pooled baseline and print its table (both commands below)."""
    from fedmed.config import load_config
    from fedmed.evaluation.baselines import run_pooled

    console = Console()
    cfg = apply_tracking(load_config(config), options.pop("tracking"), options.pop("mlflow_uri"))
    mode = "centralized" if sites is None else "local"
    summary = run_pooled(cfg, out, sites=sites, mode=mode, console=console, **options)
    console.print(_summary_table(summary, f"{title}: {out}"))
    console.print(f"run directory: [bold]{out}[/] ({summary['wall_seconds']:.0f} s)")


def centralized(
    config: Path = ConfigOpt,
    out: Path = OutOpt,
    epochs: int = EpochsOpt,
    force: bool = ForceOpt,
    tracking: str | None = TrackingOpt,
    mlflow_uri: str | None = MlflowUriOpt,
) -> None:
    """Train on every site's training cases pooled: the upper-bound baseline."""
    _pooled(config, out, None, "centralized", epochs=epochs, force=force, tracking=tracking,
            mlflow_uri=mlflow_uri)


def local(
    config: Path = ConfigOpt,
    site: str = typer.Option(..., help="The site that trains alone."),
    out: Path = OutOpt,
    epochs: int = EpochsOpt,
    force: bool = ForceOpt,
    tracking: str | None = TrackingOpt,
    mlflow_uri: str | None = MlflowUriOpt,
) -> None:
    """Train on one site's training cases alone: the local-only baseline."""
    _pooled(config, out, [site], f"local-only {site}", epochs=epochs, force=force,
            tracking=tracking, mlflow_uri=mlflow_uri)


def register(app: typer.Typer) -> None:
    """Add ``centralized`` and ``local`` to the top-level app."""
    app.command()(centralized)
    app.command()(local)
