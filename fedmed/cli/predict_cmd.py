"""``fedmed predict``: segment scans with a trained model (NIfTI masks or DICOM SEG)."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedmed.training.checkpoint import LoadedModel
    from fedmed.training.inference import Prediction

MaskWriter = Callable[[Path, "Prediction"], Path]


class OutputFormat(str, Enum):
    """What ``predict`` writes."""

    nifti = "nifti"
    dicom_seg = "dicom-seg"


def register(app: typer.Typer) -> None:
    """Add ``predict`` to the top-level app."""

    @app.command()
    def predict(
        model: Path = typer.Option(..., help="RUN/model.pt"),
        image: list[str] = typer.Option(
            None, help="Input scan, MODALITY=PATH or a path naming the modality; repeatable."
        ),
        out: Path = typer.Option(
            ...,
            help="Output mask (.nii.gz, or .dcm with --format dicom-seg), or a folder "
            "with --site-dir.",
        ),
        site_dir: Path = typer.Option(None, help="Predict every case of a site folder."),
        device: str = typer.Option(None, help="cpu or cuda (default: the model's config)."),
        output_format: OutputFormat = typer.Option(
            OutputFormat.nifti,
            "--format",
            help="nifti: a mask in the input's geometry; dicom-seg: a DICOM Segmentation "
            "that references the input DICOM series (or --dicom-reference).",
        ),
        dicom_reference: Path = typer.Option(
            None, help="DICOM series folder the SEG references when the input is not one."
        ),
        codes: Path = typer.Option(
            None, help="Code table (YAML/JSON) for labels other than CSF, GM, WM, lesion."
        ),
    ) -> None:
        """Segment scans and write masks in the input's exact shape and affine."""
        from fedmed.errors import FedMedError
        from fedmed.training.checkpoint import load_model
        from fedmed.training.inference import predict_images

        console = Console()
        loaded = load_model(model, device=device or "cpu")
        writer = _mask_writer(loaded, output_format, dicom_reference, codes)
        if site_dir is not None:
            if dicom_reference is not None:
                raise FedMedError("--dicom-reference names one series; not with --site-dir")
            _predict_site(loaded, site_dir, out, console, writer, output_format, device)
            return
        if not image:
            raise FedMedError("give --image (one per modality) or --site-dir")
        images = _read_inputs(
            image, loaded.cfg.modalities, loaded.cfg.preprocessing.max_case_megavoxels
        )
        if output_format is OutputFormat.dicom_seg:  # before inference: is there a series?
            from fedmed.export.dicom_seg import reference_series

            first = next(m for m in loaded.cfg.modalities if m in images)
            reference_series(images[first].source, dicom_reference)
        pred = predict_images(loaded, images, device=device)
        dest = writer(out, pred)
        counts = {
            loaded.cfg.labels[int(v)]: int((pred.label == v).sum())
            for v in sorted(set(pred.label.ravel().tolist()))
        }
        console.print(f"wrote {dest}: shape {pred.label.shape}, voxels per label {counts}")


def _read_inputs(
    image: list[str], modalities: tuple[str, ...], max_megavoxels: float
) -> dict[str, Any]:
    """``--image`` arguments as images keyed by modality (one 4D file may hold them all)."""
    from fedmed.data.io import read_image
    from fedmed.training.inference import assign_modalities, split_channels

    if len(image) == 1 and "=" not in image[0]:
        img = read_image(image[0], max_megavoxels=max_megavoxels)
        if img.array.shape[0] > 1:
            return split_channels(img, modalities)
    paths = assign_modalities(image, modalities)
    return {m: read_image(p, max_megavoxels=max_megavoxels) for m, p in paths.items()}


def _mask_writer(
    loaded: LoadedModel,
    output_format: OutputFormat,
    dicom_reference: Path | None,
    codes: Path | None,
) -> MaskWriter:
    """The function that writes one prediction; checks the options before any inference."""
    from fedmed.errors import FedMedError

    if output_format is OutputFormat.nifti:
        if dicom_reference is not None or codes is not None:
            raise FedMedError("--dicom-reference and --codes apply to --format dicom-seg only")
        from fedmed.data.io import write_label_like

        return lambda out, pred: write_label_like(out, pred.label, pred.reference)

    from fedmed.export.codes import load_code_table, segment_codes
    from fedmed.export.dicom_seg import write_prediction_seg

    table = load_code_table(codes) if codes is not None else None
    segment_codes({int(k): v for k, v in loaded.cfg.labels.items()}, table)  # fail early
    if dicom_reference is not None and not dicom_reference.is_dir():
        raise FedMedError(
            f"--dicom-reference {dicom_reference}: not a folder; give a DICOM series folder"
        )
    return lambda out, pred: write_prediction_seg(out, pred, loaded, dicom_reference, table)


def _predict_site(
    loaded: LoadedModel,
    site_dir: Path,
    out: Path,
    console: Console,
    writer: MaskWriter,
    output_format: OutputFormat,
    device: str | None,
) -> None:
    import numpy as np

    from fedmed.data.formats import load_site
    from fedmed.data.io import read_image
    from fedmed.data.planning import plan_preprocessing
    from fedmed.data.preprocess import read_case_images
    from fedmed.training.inference import predict_images
    from fedmed.training.metrics import case_metrics

    cfg = loaded.cfg
    manifest = load_site(site_dir, expected_modalities=cfg.modalities)
    settings = plan_preprocessing(cfg, target_spacing=loaded.target_spacing)
    suffix = ".dcm" if output_format is OutputFormat.dicom_seg else ".nii.gz"
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"predictions for {site_dir}")
    table.add_column("case")
    table.add_column("mask")
    table.add_column("Dice (if labelled)", justify="right")
    for case in manifest.cases:
        pred = predict_images(loaded, read_case_images(case, settings), device=device)
        dest = writer(out / f"{case.case_id}{suffix}", pred)
        dice = "-"
        if case.label is not None and case.label.is_file():
            truth = read_image(case.label, max_megavoxels=settings.max_megavoxels).array[0]
            truth = truth.astype(np.int64)
            if truth.shape == pred.label.shape:
                m = case_metrics(pred.label, truth, cfg.num_classes)
                dice = f"{np.nanmean(list(m.dice.values())):.3f}"
        table.add_row(case.case_id, str(dest), dice)
    console.print(table)
