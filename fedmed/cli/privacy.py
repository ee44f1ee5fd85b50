"""`fedmed privacy ...` commands: read the sites' privacy ledgers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmed.errors import PrivacyError

app = typer.Typer(no_args_is_help=True)


def _summaries(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    from fedmed.training.ledger import PrivacyLedger, find_ledgers

    paths = find_ledgers(folder)
    if not paths:
        raise PrivacyError(
            f"no privacy ledger (ledger-<run>-<site>.json) under {folder}; DP runs write one "
            "per site into the site's state folder (default ./.fedmed-state)"
        )
    out, problems = [], []
    for p in paths:
        try:
            data = PrivacyLedger.load(p).to_dict()
        except PrivacyError as exc:
            # one damaged file must not hide the other sites' ledgers
            problems.append(str(exc))
            continue
        data["path"] = str(p)
        out.append(data)
    return out, problems


@app.command("report")
def report(
    folder: Annotated[
        Path, typer.Argument(help="Run folder or site state folder; searched recursively.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print every site's privacy ledger: rounds, steps, sampling rate, sigma, epsilon.

    Epsilon is recomputed from each ledger's composition with a fresh Opacus accountant.
    """
    ledgers, problems = _summaries(folder)
    console = Console()
    if as_json:
        console.print_json(json.dumps(ledgers))
    else:
        _print_tables(console, folder, ledgers)
    if problems:
        raise PrivacyError(
            f"{len(problems)} ledger file(s) could not be read:\n  " + "\n  ".join(problems)
        )


def _print_tables(console: Console, folder: Path, ledgers: list[dict[str, Any]]) -> None:
    overview = Table(title=f"Privacy ledgers under {folder}")
    for col in ("run", "site", "accountant", "rounds", "steps", "epsilon", "delta", "skipped"):
        numeric = col in ("rounds", "steps", "epsilon")
        overview.add_column(col, justify="right" if numeric else "left")
    for d in ledgers:
        overview.add_row(
            d["run_id"], str(d["site"]), d["accountant"], str(len(d["entries"])),
            str(d["total_steps"]), f"{d['epsilon']:.3f}", f"{d['delta']:g}",
            str(len(d["skips"])),
        )
    console.print(overview)
    for d in ledgers:
        table = Table(
            title=f"{d['site']} (run {d['run_id']}, {d['accountant']}, delta={d['delta']:g})",
            caption=d["path"],
        )
        for col in ("round", "epochs", "steps", "sampling rate", "sigma", "clip norm",
                    "cases", "epsilon"):
            table.add_column(col, justify="right")
        for e in d["entries"]:
            table.add_row(
                "-" if e["round"] is None else str(e["round"]), str(e["epochs"]),
                str(e["steps"]), f"{e['sample_rate']:.4g}", f"{e['noise_multiplier']:.4g}",
                f"{e['max_grad_norm']:.3g}", str(e["num_cases"]), f"{e['epsilon']:.3f}",
            )
        console.print(table)
        for s in d["skips"]:
            console.print(f"  round {s['round']}: {s['reason']}", highlight=False)
