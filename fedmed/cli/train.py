"""``fedmed centralized`` and ``fedmed local``."""

from __future__ import annotations

from pathlib import Path

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


def centralized(
    config: Path = ConfigOpt,
    out: Path = OutOpt,
    epochs: int = typer.Option(None, min=1, help="Override training.epochs."),
    force: bool = typer.Option(False, help="Replace an existing run directory."),
    tracking: str | None = TrackingOpt,
    mlflow_uri: str | None = MlflowUriOpt,
) -> None:
    """Train on every site's training cases pooled: the upper-bound baseline."""
    from fedmed.config import load_config
    from fedmed.evaluation.baselines import run_pooled

    console = Console()
    cfg = apply_tracking(load_config(config), tracking, mlflow_uri)
    summary = run_pooled(cfg, out, epochs=epochs, force=force, console=console)
    console.print(_summary_table(summary, f"centralized: {out}"))
    console.print(f"run directory: [bold]{out}[/] ({summary['wall_seconds']:.0f} s)")


def local(
    config: Path = ConfigOpt,
    site: str = typer.Option(..., help="The site that trains alone."),
    out: Path = OutOpt,
    epochs: int = typer.Option(None, min=1, help="Override training.epochs."),
    force: bool = typer.Option(False, help="Replace an existing run directory."),
    tracking: str | None = TrackingOpt,
    mlflow_uri: str | None = MlflowUriOpt,
) -> None:
    """Train on one site's training cases alone: the local-only baseline."""
    from fedmed.config import load_config
    from fedmed.evaluation.baselines import run_pooled

    console = Console()
    summary = run_pooled(
        apply_tracking(load_config(config), tracking, mlflow_uri),
        out,
        sites=[site],
        mode="local",
        epochs=epochs,
        force=force,
        console=console,
    )
    console.print(_summary_table(summary, f"local-only {site}: {out}"))
    console.print(f"run directory: [bold]{out}[/] ({summary['wall_seconds']:.0f} s)")


def register(app: typer.Typer) -> None:
    """Add ``centralized`` and ``local`` to the top-level app."""
    app.command()(centralized)
    app.command()(local)
