"""`fedmed data synth`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from fedmed.cli.params import FiniteFloatRange


def register(app: typer.Typer) -> None:
    """Add `synth` to the `fedmed data` app."""
    app.command("synth")(synth)


def synth(
    out: Path = typer.Option(
        ..., "--out", help="Folder to create (must not exist or be empty, unless --force)."
    ),
    sites: int = typer.Option(4, "--sites", min=1, help="Number of training sites."),
    cases_per_site: int = typer.Option(
        17, "--cases-per-site", min=1, help="Mean cases per site (sizes are skewed)."
    ),
    test_cases: int = typer.Option(
        8, "--test-cases", min=0, help="Central test cases, drawn from every site's scanner."
    ),
    unseen_cases: int = typer.Option(
        6, "--unseen-cases", min=0, help="Cases of an unseen scanner (unseen-scanner/)."
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Same seed and options: byte-identical files."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace --out if it holds an earlier synthetic federation."
    ),
    scale: float = typer.Option(
        1.0,
        "--scale",
        click_type=FiniteFloatRange(min=0.25, max=10.0),
        help="Voxel-size multiplier (>1: smaller volumes).",
    ),
    workers: int = typer.Option(
        1, "--workers", min=1, help="Processes generating cases (the output does not change)."
    ),
) -> None:
    """Generate a synthetic multi-site brain MRI federation from the MNI152 template."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from fedmed.data.synth import federation_summary, generate_federation

    console = Console()
    start = time.perf_counter()
    cfg = generate_federation(
        out,
        sites=sites,
        cases_per_site=cases_per_site,
        test_cases=test_cases,
        unseen_cases=unseen_cases,
        seed=seed,
        progress=True,
        force=force,
        scale=scale,
        workers=workers,
    )
    seconds = time.perf_counter() - start
    summary = federation_summary(out)
    table = Table(title=f"synthetic federation (seed {seed})", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col in ("site", "format", "cases", "spacing mm", "axes", "voxels", "lacks", "lesions"):
        table.add_column(col, no_wrap=col == "site", overflow="fold")
    rows = list(summary["sites"])
    if "unseen" in summary:
        rows.append(summary["unseen"])
    for r in rows:
        table.add_row(
            r["name"], r["format"], str(r["cases"]), "x".join(f"{s:g}" for s in r["spacing"]),
            r["orientation"], "x".join(str(s) for s in r["shape"]), ",".join(r["missing"]) or "-",
            f"{r['lesion_load']:g}",
        )
    if "central_test" in summary:
        ct = summary["central_test"]
        table.add_row("central-test", "folder", str(ct["cases"]), "every site's", "", "", "-", "")
    console.print(table)
    console.print(f"wrote {cfg} in {seconds:.1f} s", soft_wrap=True)
