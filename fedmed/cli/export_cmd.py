"""``fedmed export``: a run's model in the formats other tools read."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


@app.command("bundle")
def bundle(
    run: Path = typer.Argument(..., help="Run folder (holds model.pt)."),
    out: Path = typer.Argument(..., help="Bundle folder to create."),
    force: bool = typer.Option(False, help="Replace an existing bundle folder."),
) -> None:
    """Write a MONAI Bundle of the run's model and validate it with MONAI's bundle tools."""
    from fedmed.export.bundle import export_bundle

    console = Console()
    result = export_bundle(run, out, force=force)
    console.print(f"wrote MONAI Bundle [bold]{result.path}[/]: {', '.join(result.files)}")
    console.print(f"validated with monai.bundle: {', '.join(result.checks)}")
    console.print(
        "run it: python -m monai.bundle run "
        f"--config_file {out}/configs/inference.json --meta_file {out}/configs/metadata.json "
        f"--bundle_root {out} --dataset_dir SITE_DIR --output_dir MASK_DIR",
        soft_wrap=True,
        highlight=False,
    )
