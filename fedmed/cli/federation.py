"""Top-level training commands (federation): ``fedmed simulate``.

``fedmed compare`` lives with the evaluation code (``fedmed/evaluation``) and calls
:func:`fedmed.federation.simulation.run_federated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fedmed.cli.tracking_opts import MlflowUriOpt, TrackingOpt, apply_tracking


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def round_printer(console: Console, rounds: int) -> Any:
    """A callback printing one line per finished round (round, central Dice, loss, time)."""

    def show(line: Mapping[str, Any]) -> None:
        sites = line.get("sites_trained") or []
        extra = ""
        if line.get("sites_failed"):
            extra += f"  [red]failed: {', '.join(line['sites_failed'])}[/]"
        if line.get("sites_skipped"):
            extra += f"  [yellow]skipped: {', '.join(line['sites_skipped'])}[/]"
        if line.get("sites_refused"):
            refused = ", ".join(f"{s} ({c})" for s, c in line["sites_refused"].items())
            extra += f"  [yellow]refused: {refused}[/]"
        if line.get("sites_rejected"):
            extra += f"  [red]rejected: {', '.join(line['sites_rejected'])}[/]"
        console.print(
            f"round {line['round']:>3}/{rounds}  central Dice {_fmt(line.get('central_dice'))}"
            f"  sites Dice {_fmt(line.get('federated_dice'))}"
            f"  loss {_fmt(line.get('train_loss'))}  sites {len(sites)}"
            f"  {_fmt(line.get('round_seconds'), '.1f')} s{extra}",
            highlight=False,
        )

    return show


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""

    @app.command()
    def simulate(
        config: Path = typer.Option(..., "--config", "-c", help="Federation config (YAML)."),
        out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
        strategy: str | None = typer.Option(
            None, "--strategy",
            help="fedavg | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg | fedbn",
        ),
        rounds: int | None = typer.Option(None, "--rounds", min=1, help="Rounds in total."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        force: bool = typer.Option(False, "--force", help="Replace what --out holds."),
        verbose: bool = typer.Option(False, "--verbose", help="Flower's own logging."),
        ray_address: str | None = typer.Option(
            None, "--ray-address",
            help="Attach to a running Ray cluster (HOST:PORT of 'ray start --head', or "
            "'auto') instead of starting Ray on this machine; see docs/scaling.md.",
        ),
        tracking: str | None = TrackingOpt,
        mlflow_uri: str | None = MlflowUriOpt,
    ) -> None:
        """Run the whole federation in Flower's simulation engine (Ray).

        On this machine, or on a running Ray cluster with --ray-address.
        """
        from fedmed.config import load_config
        from fedmed.federation.server_app import apply_overrides
        from fedmed.federation.simulation import run_federated

        console = Console()
        cfg = apply_overrides(load_config(config), strategy=strategy, rounds=rounds)
        cfg = apply_tracking(cfg, tracking, mlflow_uri)
        fed = cfg.federation
        where = f" on Ray cluster {ray_address}" if ray_address else ""
        console.print(
            f"federation [bold]{cfg.name}[/]: {len(cfg.sites)} sites, strategy {fed.strategy}, "
            f"{fed.rounds} rounds x {fed.local_epochs} local epochs{where} -> {out}",
            highlight=False,
        )
        from fedmed.evaluation.dp_outlook import dp_outlook, print_outlook

        print_outlook(dp_outlook(cfg, fed.rounds * fed.local_epochs), console)
        summary = run_federated(
            cfg, out, resume=resume, force=force,
            on_round=round_printer(console, fed.rounds), verbose=verbose,
            ray_address=ray_address,
        )
        console.print(
            f"done in {_fmt(summary.get('wall_seconds'), '.1f')} s: Dice "
            f"{_fmt(summary.get('dice_mean'))}, HD95 {_fmt(summary.get('hd95_mean'), '.2f')} mm;"
            f" summary in {Path(out) / 'summary.json'}",
            highlight=False,
        )
