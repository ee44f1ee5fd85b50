"""DICOM Segmentation output: a label map as a SEG object that overlays its source series.

The SEG is built with highdicom from the source series' own datasets (read with pydicom),
so it carries the series' patient, study and frame of reference and references every
source instance; one segment per foreground label, with coded concepts
(:mod:`fedmed.export.codes`). Frames lie on the source slices: for each source instance the
label map is sampled (nearest neighbour, through world coordinates, with
:func:`fedmed.data.geometry.resample_label_to`) on that slice's pixel grid, so a mask on any
grid (the series' own, or a NIfTI scan's) lands where a viewer draws the series.
Supported sources: single-frame series (one file per slice, what fedmed's reader takes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.errors import ExportError
from fedmed.export.codes import SegmentCode, segment_codes

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REQUIRED = ("SeriesInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient",
             "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")  # fmt: skip


@dataclass(frozen=True)
class SegAlgorithm:
    """Who made the segmentation (the SEG's algorithm identification and equipment).

    Attributes:
        name: algorithm name, e.g. ``"fedmed unet"``.
        version: software version (fedmed's).
        model: the model's name (the federation's).
    """

    name: str
    version: str
    model: str


def read_series(series_dir: str | Path) -> list[Any]:
    """The pydicom datasets (no pixel data) of the one series in ``series_dir``.

    Raises:
        ExportError: no DICOM files, several series, a multi-frame file, or an image
            without the geometry attributes a SEG needs.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(series_dir)
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a folder; give the folder of one DICOM series")
    datasets = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError):
            continue  # DICOMDIR-less folders hold other files too
    if not datasets:
        raise ExportError(f"{folder}: holds no DICOM files (expected one file per slice)")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise ExportError(
            f"{folder}: holds {len(series)} DICOM series; put each series in its own folder"
        )
    for ds in datasets:
        missing = [a for a in _REQUIRED if a not in ds]
        if missing or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ExportError(
                f"{folder}: {Path(str(ds.filename)).name} is not a single-frame image with its "
                f"geometry (missing {missing or 'nothing'}, frames "
                f"{ds.get('NumberOfFrames', 1)}); a DICOM SEG needs a classic one-file-per-"
                "slice series"
            )
    return datasets


def slice_affine(ds: Any) -> np.ndarray:
    """Voxel-to-RAS affine of one slice's pixel grid, indexed ``(column, row, 0)``."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing  # along a row: the column index grows
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = np.cross(iop[:3], iop[3:])
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return _LPS_TO_RAS @ lps


def frames_on_series(label: np.ndarray, affine: np.ndarray, datasets: Sequence[Any]) -> np.ndarray:
    """The label map sampled on each source slice: ``(n_slices, rows, columns)``.

    Args:
        label: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` integer labels.
        affine: voxel-to-RAS of ``label``.
        datasets: the source slices (:func:`read_series`), in the order of the output.
    """
    from fedmed.data.geometry import resample_label_to

    lab = np.asarray(label)
    lab = lab[0] if lab.ndim == 4 else lab
    frames = []
    for ds in datasets:
        cols, rows = int(ds.Columns), int(ds.Rows)
        on_slice = resample_label_to(lab, affine, slice_affine(ds), (cols, rows, 1))
        frames.append(np.asarray(on_slice)[:, :, 0].T)
    return np.stack(frames).astype(np.uint8)


def _coded(spec: Any) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=spec.value, scheme_designator=spec.scheme, meaning=spec.meaning)


def segment_descriptions(
    labels: Mapping[int, str], codes: Mapping[int, SegmentCode], algorithm: SegAlgorithm
) -> list[Any]:
    """One highdicom ``SegmentDescription`` per foreground label (segment number = label)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    ident = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=dcm_codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=labels[value],
            segmented_property_category=_coded(code.category),
            segmented_property_type=_coded(code.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ident,
        )
        for value, code in sorted(codes.items())
    ]


def write_dicom_seg(
    out: str | Path,
    label: np.ndarray,
    affine: np.ndarray,
    series_dir: str | Path,
    labels: Mapping[int, str],
    algorithm: SegAlgorithm,
    code_table: Mapping[str, SegmentCode] | None = None,
) -> Path:
    """Write a DICOM SEG of ``label`` that references the series in ``series_dir``.

    Args:
        out: the SEG file to write (``.dcm``).
        label: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` integer labels (0 = background).
        affine: voxel-to-RAS of ``label`` (any grid that overlaps the series).
        series_dir: the source series (single-frame images, one series).
        labels: label value -> name, every value ``label`` holds; values ``1..K-1``.
        algorithm: who made it.
        code_table: codes for labels fedmed does not know (:func:`load_code_table`).

    Raises:
        ExportError: unreadable series, labels without codes, or highdicom refusing the input.
    """
    import highdicom as hd

    codes = segment_codes(labels, code_table)
    datasets = read_series(series_dir)
    frames = frames_on_series(label, affine, datasets)
    unknown = sorted(set(np.unique(frames).tolist()) - set(codes) - {0})
    if unknown:
        raise ExportError(f"label values {unknown} are not among the model's labels {labels}")
    first = datasets[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(labels, codes, algorithm),
            series_instance_uid=hd.UID(),
            series_number=_series_number(first),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="fedmed",
            manufacturer_model_name=algorithm.model[:64],
            software_versions=algorithm.version,
            device_serial_number="none",
            series_description=f"{algorithm.name} segmentation"[:64],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot build a DICOM SEG for {series_dir}: {exc}") from None
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(dest)
    return dest


def _series_number(source: Any) -> int:
    """The source's series number plus 1000 (a common convention for derived series)."""
    try:
        return int(source.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000


def reference_series(source: Path | None, dicom_reference: str | Path | None) -> Path:
    """The series a SEG references: ``dicom_reference``, else the input when it is a series.

    Raises:
        ExportError: neither is a DICOM series folder.
    """
    if dicom_reference is not None:
        return Path(dicom_reference)
    if source is not None and Path(source).is_dir():
        return Path(source)
    raise ExportError(
        f"--format dicom-seg: the input {source} is not a DICOM series folder; give the "
        "series the mask belongs to with --dicom-reference SERIES_DIR"
    )


def write_prediction_seg(
    out: str | Path,
    prediction: Any,
    loaded: Any,
    dicom_reference: str | Path | None = None,
    code_table: Mapping[str, SegmentCode] | None = None,
) -> Path:
    """Write ``fedmed predict``'s mask as a DICOM SEG.

    Args:
        out: the SEG file.
        prediction: a :class:`fedmed.training.inference.Prediction` (labels on its reference).
        loaded: the :class:`fedmed.training.checkpoint.LoadedModel` that made it.
        dicom_reference: the series to reference; default the input itself (a DICOM series).
        code_table: codes for labels fedmed does not know.

    Raises:
        ExportError: no series to reference, or the SEG cannot be built.
    """
    import fedmed

    cfg = loaded.cfg
    series = reference_series(prediction.reference.source, dicom_reference)
    algorithm = SegAlgorithm(
        name=f"fedmed {cfg.model.architecture}", version=fedmed.__version__, model=cfg.name
    )
    return write_dicom_seg(
        out,
        prediction.label,
        prediction.reference.affine,
        series,
        {int(k): str(v) for k, v in cfg.labels.items()},
        algorithm,
        code_table,
    )
