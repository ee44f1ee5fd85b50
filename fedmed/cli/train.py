"""``fedmed centralized``, ``fedmed local`` and ``fedmed predict``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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


def register(app: typer.Typer) -> None:
    """Add ``centralized``, ``local`` and ``predict`` to the top-level app."""

    @app.command()
    def centralized(
        config: Path = ConfigOpt,
        out: Path = OutOpt,
        epochs: int = typer.Option(None, help="Override training.epochs."),
        force: bool = typer.Option(False, help="Replace an existing run directory."),
    ) -> None:
        """Train on every site's training cases pooled: the upper-bound baseline."""
        from fedmed.config import load_config
        from fedmed.evaluation.baselines import run_pooled

        console = Console()
        summary = run_pooled(load_config(config), out, epochs=epochs, force=force, console=console)
        console.print(_summary_table(summary, f"centralized: {out}"))
        console.print(f"run directory: [bold]{out}[/] ({summary['wall_seconds']:.0f} s)")

    @app.command()
    def local(
        config: Path = ConfigOpt,
        site: str = typer.Option(..., help="The site that trains alone."),
        out: Path = OutOpt,
        epochs: int = typer.Option(None, help="Override training.epochs."),
        force: bool = typer.Option(False, help="Replace an existing run directory."),
    ) -> None:
        """Train on one site's training cases alone: the local-only baseline."""
        from fedmed.config import load_config
        from fedmed.evaluation.baselines import run_pooled

        console = Console()
        summary = run_pooled(
            load_config(config),
            out,
            sites=[site],
            mode="local",
            epochs=epochs,
            force=force,
            console=console,
        )
        console.print(_summary_table(summary, f"local-only {site}: {out}"))
        console.print(f"run directory: [bold]{out}[/] ({summary['wall_seconds']:.0f} s)")

    @app.command()
    def predict(
        model: Path = typer.Option(..., help="RUN/model.pt"),
        image: list[str] = typer.Option(
            None, help="Input scan, MODALITY=PATH or a path naming the modality; repeatable."
        ),
        out: Path = typer.Option(..., help="Output mask (.nii.gz), or a folder with --site-dir."),
        site_dir: Path = typer.Option(None, help="Predict every case of a site folder."),
        device: str = typer.Option(None, help="cpu or cuda (default: the model's config)."),
    ) -> None:
        """Segment scans and write masks in the input's exact shape and affine."""
        from fedmed.data.io import read_image
        from fedmed.errors import FedMedError
        from fedmed.training.checkpoint import load_model
        from fedmed.training.inference import (
            assign_modalities,
            predict_images,
            split_channels,
        )

        console = Console()
        loaded = load_model(model, device=device or "cpu")
        mods = loaded.cfg.modalities
        if site_dir is not None:
            _predict_site(loaded, site_dir, out, console)
            return
        if not image:
            raise FedMedError("give --image (one per modality) or --site-dir")
        if len(image) == 1 and "=" not in image[0]:
            img = read_image(image[0])
            images = split_channels(img, mods) if img.array.shape[0] > 1 else None
        else:
            images = None
        if images is None:
            paths = assign_modalities(image, mods)
            images = {m: read_image(p) for m, p in paths.items()}
        from fedmed.data.io import write_label_like

        pred = predict_images(loaded, images, device=device)
        write_label_like(out, pred.label, pred.reference)
        counts = {
            loaded.cfg.labels[int(v)]: int((pred.label == v).sum())
            for v in sorted(set(pred.label.ravel().tolist()))
        }
        console.print(f"wrote {out}: shape {pred.label.shape}, voxels per label {counts}")


def _predict_site(loaded: object, site_dir: Path, out: Path, console: Console) -> None:
    import numpy as np

    from fedmed.data.formats import load_site
    from fedmed.data.io import read_image, write_label_like
    from fedmed.data.preprocess import PreprocessSettings, read_case_images
    from fedmed.training.checkpoint import LoadedModel
    from fedmed.training.inference import predict_images
    from fedmed.training.metrics import case_metrics

    assert isinstance(loaded, LoadedModel)
    cfg = loaded.cfg
    manifest = load_site(site_dir, expected_modalities=cfg.modalities)
    settings = PreprocessSettings.from_config(cfg, target_spacing=loaded.target_spacing)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"predictions for {site_dir}")
    table.add_column("case")
    table.add_column("mask")
    table.add_column("Dice (if labelled)", justify="right")
    for case in manifest.cases:
        pred = predict_images(loaded, read_case_images(case, settings))
        dest = write_label_like(out / f"{case.case_id}.nii.gz", pred.label, pred.reference)
        dice = "-"
        if case.label is not None and case.label.is_file():
            truth = read_image(case.label).array[0].astype(np.int64)
            if truth.shape == pred.label.shape:
                m = case_metrics(pred.label, truth, cfg.num_classes)
                dice = f"{np.nanmean(list(m.dice.values())):.3f}"
        table.add_row(case.case_id, str(dest), dice)
    console.print(table)
