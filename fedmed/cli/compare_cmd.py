"""``fedmed compare``: the researcher's headline workflow."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmed.cli.tracking_opts import MlflowUriOpt, TrackingOpt, apply_tracking


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the top-level app."""

    @app.command()
    def compare(
        config: Path = typer.Option(..., "--config", "-c", help="Federation config (YAML)."),
        out: Path = typer.Option(
            ..., "--out", "-o",
            help="Comparison folder; run again into the same folder to add arms (unchanged "
            "arms are reused).",
        ),
        strategies: str = typer.Option(
            "fedavg,fedprox,fedbn", help="Comma-separated federated strategies to compare."
        ),
        dp: bool = typer.Option(False, "--dp", help="Add FedAvg with patient-level DP."),
        rerun: bool = typer.Option(
            False, "--rerun", help="Retrain every requested arm, even unchanged ones."
        ),
        force: bool = typer.Option(
            False, help="Write into a non-empty --out that holds no comparison."
        ),
        tracking: str | None = TrackingOpt,
        mlflow_uri: str | None = MlflowUriOpt,
    ) -> None:
        """Centralized vs local-only vs federated under matched compute; writes a report.

        An arm (centralized, each local-only site, each strategy, the DP run) whose config,
        data and fedmed version are unchanged since it finished in --out is reused.
        """
        from rich.console import Console

        from fedmed.config import load_config
        from fedmed.evaluation.compare import run_comparison

        names = [s.strip().lower() for s in strategies.split(",") if s.strip()]
        cfg = apply_tracking(load_config(config), tracking, mlflow_uri)
        run_comparison(
            cfg, out, strategies=names, dp=dp, force=force, rerun=rerun, console=Console()
        )
