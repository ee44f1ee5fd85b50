"""``fedmed compare``: the researcher's headline workflow."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the top-level app."""

    @app.command()
    def compare(
        config: Path = typer.Option(..., "--config", "-c", help="Federation config (YAML)."),
        out: Path = typer.Option(..., "--out", "-o", help="Comparison folder to create."),
        strategies: str = typer.Option(
            "fedavg,fedprox,fedbn", help="Comma-separated federated strategies to compare."
        ),
        dp: bool = typer.Option(False, "--dp", help="Add FedAvg with patient-level DP."),
        force: bool = typer.Option(False, help="Replace an existing comparison folder."),
    ) -> None:
        """Centralized vs local-only vs federated under matched compute; writes a report."""
        from rich.console import Console

        from fedmed.config import load_config
        from fedmed.evaluation.compare import run_comparison

        names = [s.strip().lower() for s in strategies.split(",") if s.strip()]
        run_comparison(
            load_config(config), out, strategies=names, dp=dp, force=force, console=Console()
        )
