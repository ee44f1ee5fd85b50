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


def _run_state_dirs(folder: Path) -> tuple[str, list[Path]] | None:
    """A run folder's run id and the state folders of its (simulated) sites, if it is one."""
    from fedmed.config import load_config

    if not ((folder / "config.yaml").is_file() and (folder / "run-id").is_file()):
        return None
    cfg = load_config(folder / "config.yaml")
    return (folder / "run-id").read_text().strip(), [cfg.site_state_dir(s) for s in cfg.site_names]


@app.command("report")
def report(
    folder: Annotated[
        Path | None,
        typer.Argument(help="A run folder (its sites' ledgers of that run), or a folder of "
                       "ledger files; searched recursively."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="A site's state folder: the lifetime ε of each of "
                     "its datasets over every run, and each run's share."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print privacy ledgers: rounds, steps, sampling rate, sigma, epsilon.

    Epsilon is recomputed from each ledger's composition with a fresh Opacus accountant.
    """
    if (folder is None) == (state_dir is None):
        raise typer.BadParameter("give either a FOLDER or --state-dir DIR (one of them)")
    console = Console()
    if state_dir is not None:
        _lifetime(console, state_dir, as_json)
        return
    assert folder is not None  # for mypy: checked above
    run = _run_state_dirs(folder)
    if run is None:
        ledgers, problems = _summaries(folder)
    else:
        run_id, dirs = run
        found = [_summaries(d) for d in dirs if d.is_dir() and any(d.rglob("ledger-*.json"))]
        ledgers = [led for f, _ in found for led in f if led["run_id"] == run_id]
        problems = [p for _, ps in found for p in ps]
        if not ledgers:
            raise PrivacyError(f"no site of run {run_id} ({folder}) holds a privacy ledger of it")
    if as_json:
        console.print_json(json.dumps(ledgers))
    else:
        _print_tables(console, folder, ledgers)
    if problems:
        raise PrivacyError(
            f"{len(problems)} ledger file(s) could not be read:\n  " + "\n  ".join(problems)
        )


def _lifetime(console: Console, state_dir: Path, as_json: bool) -> None:
    from fedmed.training.ledger import lifetime_report

    datasets = lifetime_report(state_dir)
    if as_json:
        console.print_json(json.dumps(datasets))
        return
    for d in datasets:
        table = Table(title=f"dataset {d['dataset']}: lifetime epsilon {d['epsilon']:.3f} at "
                      f"delta {d['delta']:g} over {len(d['runs'])} run(s), {d['steps']} steps")
        for col in ("run", "site", "steps", "epsilon of the run alone"):
            table.add_column(col, justify="right" if col != "run" else "left")
        for r in d["runs"]:
            table.add_row(r["run_id"], str(r["site"]), str(r["steps"]), f"{r['epsilon']:.3f}")
        console.print(table)


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
