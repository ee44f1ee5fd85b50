"""The check rules: small functions that each return the problems of one aspect of a case.

Manifest-level rules (missing modalities, no label) need no file; file-level rules work on
one file's header or voxels (readable, 3D, size, channels, finite, not constant, geometry,
label values). :mod:`fedmed.data.check.runner` composes them, reading each file once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.check.problems import Problem, ProblemKind
from fedmed.data.formats import Case, ManifestProblem
from fedmed.data.io import IMAGE_SUFFIXES, Image, image_suffix, read_image, world_coordinates
from fedmed.errors import ImageReadError, PreprocessingError


@dataclass(frozen=True)
class CheckSettings:
    """Thresholds of the checks.

    Attributes:
        affine_tolerance_mm: largest allowed world-space displacement (mm) of any corner
            voxel between two files of a case.
        max_megavoxels: largest allowed image size, in millions of voxels per channel.
        require_all_modalities: treat a modality the federation expects but the site never
            had as an error instead of a warning.
    """

    affine_tolerance_mm: float = 1.0
    max_megavoxels: float = 64.0
    require_all_modalities: bool = False

    def __post_init__(self) -> None:
        if not self.affine_tolerance_mm > 0:
            raise PreprocessingError(
                f"affine_tolerance_mm must be positive (mm), got {self.affine_tolerance_mm}"
            )
        if not self.max_megavoxels > 0:
            raise PreprocessingError(f"max_megavoxels must be positive, got {self.max_megavoxels}")

    @classmethod
    def from_config(cls, preprocessing: Any, **overrides: Any) -> CheckSettings:
        """Settings from a :class:`~fedmed.config.PreprocessingConfig` (or a whole config).

        Args:
            preprocessing: ``cfg.preprocessing`` or the :class:`FederationConfig` itself.
            **overrides: fields to replace (``None`` values are ignored).
        """
        pre = getattr(preprocessing, "preprocessing", preprocessing)
        values: dict[str, Any] = {
            "affine_tolerance_mm": float(pre.affine_tolerance_mm),
            "max_megavoxels": float(pre.max_case_megavoxels),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _problem(kind: ProblemKind, case_id: str, file: Path | str, what: str, fix: str) -> Problem:
    where = f"case {case_id!r}" + (f", {file}" if str(file) else "")
    return Problem(kind, str(file), f"{where}: {what}; {fix}")


# -- manifest-level checks ---------------------------------------------------------------

_MANIFEST_KINDS = {
    "duplicate_case": ProblemKind.DUPLICATE_CASE,
    "path_escapes_site": ProblemKind.PATH_ESCAPES_SITE,
    "unexpected_modality": ProblemKind.UNEXPECTED_MODALITY,
}


def check_manifest_problems(case_id: str, problems: Sequence[ManifestProblem]) -> list[Problem]:
    """The manifest problems that ``load_site`` recorded for ``case_id``."""
    out = []
    for mp in problems:
        if mp.case_id != case_id:
            continue
        kind = _MANIFEST_KINDS.get(getattr(mp, "kind", "manifest"), ProblemKind.MANIFEST)
        where = f"case {case_id!r}" + (f", {mp.file}" if mp.file else "")
        out.append(Problem(kind, mp.file, f"{where}: {mp.message}"))
    return out


def check_modalities(
    case: Case, declared: Sequence[str] | None, settings: CheckSettings
) -> list[Problem]:
    """Missing modalities: an error when the site declares them, else a warning.

    Args:
        case: the case.
        declared: modalities the site itself declares (``None``: treat all as declared).
        settings: ``require_all_modalities`` turns the warnings into errors.
    """
    out = []
    for m in case.missing:
        if declared is None or m in declared or settings.require_all_modalities:
            out.append(
                _problem(
                    ProblemKind.MISSING_MODALITY,
                    case.case_id,
                    "",
                    f"modality {m!r} is missing",
                    "restore the file (or fix its name/manifest entry) so every case has all "
                    "the site's modalities",
                )
            )
        else:
            out.append(
                _problem(
                    ProblemKind.ABSENT_MODALITY,
                    case.case_id,
                    "",
                    f"modality {m!r} expected by the federation is not provided by this site",
                    "training uses a zero channel for it; add the modality if the site has it",
                )
            )
    return out


def check_label_present(case: Case) -> list[Problem]:
    """A warning when the manifest names no label map."""
    if case.label is not None:
        return []
    return [
        _problem(
            ProblemKind.NO_LABEL,
            case.case_id,
            "",
            "the manifest names no label map",
            "add the label file to train on this case (unlabelled cases are only predicted)",
        )
    ]


# -- file-level checks --------------------------------------------------------------------


_READ_FAILURE_KINDS = {
    "missing": ProblemKind.MISSING_FILE,
    "unsupported": ProblemKind.NOT_AN_IMAGE,
    "not_an_image": ProblemKind.NOT_AN_IMAGE,
    "corrupt": ProblemKind.CORRUPT,
    "not_3d": ProblemKind.NOT_3D,
    "too_large": ProblemKind.TOO_LARGE,
    "non_finite": ProblemKind.NON_FINITE,
    "bad_affine": ProblemKind.BAD_AFFINE,
}
"""The problem kind of each reason :func:`fedmed.data.io.read_image` refuses a file for."""


def check_readable(
    case_id: str, path: Path, settings: CheckSettings
) -> tuple[Image | None, list[Problem]]:
    """Read one file through the shared reader, reporting why it refuses it.

    The rules are the reader's own (:func:`fedmed.data.io.read_image`, the same on every
    path that reads data): the header's size against ``settings.max_megavoxels`` and its
    dimensions and affine before the voxels are read, then finite voxel values.

    Returns:
        ``(image, [])`` on success, else ``(None, [problem])``.
    """
    if not path.exists():
        return None, [
            _problem(
                ProblemKind.MISSING_FILE,
                case_id,
                path,
                "file does not exist",
                "restore it or correct the manifest / file name",
            )
        ]
    if not path.is_dir() and image_suffix(path) not in IMAGE_SUFFIXES:
        return None, [
            _problem(
                ProblemKind.NOT_AN_IMAGE,
                case_id,
                path,
                f"unsupported file type {image_suffix(path)!r}",
                f"convert it to one of {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder",
            )
        ]
    try:
        return read_image(path, max_megavoxels=settings.max_megavoxels), []
    except ImageReadError as exc:
        reason = str(exc)
        prefix = f"{path}: "
        reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
        kind = _READ_FAILURE_KINDS.get(exc.kind, ProblemKind.CORRUPT)
        return None, [Problem(kind, str(path), f"case {case_id!r}, {path}: {reason}")]


def check_channels(
    case_id: str, path: Path, image: Image, channel: int | None, num_declared: int
) -> list[Problem]:
    """A 3D file must hold one channel; a multi-modality 4D file one per declared modality."""
    c = image.array.shape[0]
    if channel is None:
        if c == 1:
            return []
        return [
            _problem(
                ProblemKind.NOT_3D,
                case_id,
                path,
                f"a 4D image with {c} channels where one 3D volume is expected",
                "split it into one file per modality or declare its modalities in order",
            )
        ]
    if c != num_declared or channel >= c:
        return [
            _problem(
                ProblemKind.CHANNEL_MISMATCH,
                case_id,
                path,
                f"the 4D image has {c} channels but the site declares {num_declared} modalities",
                "make the dataset.json 'modality' list match the file's channels (in order)",
            )
        ]
    return []


def check_finite(case_id: str, path: Path, array: np.ndarray, what: str) -> list[Problem]:
    """NaN or infinite voxels in ``array``."""
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad == 0:
        return []
    return [
        _problem(
            ProblemKind.NON_FINITE,
            case_id,
            path,
            f"{what} has {bad} NaN/infinite voxel(s)",
            "re-export it (a failed conversion or division by zero); fedmed does not guess "
            "values for them",
        )
    ]


def check_not_constant(case_id: str, path: Path, array: np.ndarray, what: str) -> list[Problem]:
    """An image whose voxels all have one value (empty or failed export)."""
    if array.size == 0 or float(array.min()) != float(array.max()):
        return []
    return [
        _problem(
            ProblemKind.CONSTANT_IMAGE,
            case_id,
            path,
            f"{what} is constant (every voxel = {float(array.flat[0]):g})",
            "the export is empty or failed: re-export the series",
        )
    ]


def affine_displacement_mm(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest world-space distance (mm) between the same corner voxel under two affines."""
    shp = tuple(int(s) for s in shape[:3])
    d = world_coordinates(a, shp) - world_coordinates(b, shp)
    return float(np.linalg.norm(d, axis=1).max())


def check_geometry(
    case_id: str,
    ref_path: Path,
    ref: Image,
    path: Path,
    other: Image,
    what: str,
    tolerance_mm: float,
) -> list[Problem]:
    """Shape, then affine agreement of ``other`` with the reference image of the case."""
    if other.spatial_shape != ref.spatial_shape:
        return [
            _problem(
                ProblemKind.SHAPE_MISMATCH,
                case_id,
                path,
                f"{what} has shape {other.spatial_shape} but {ref_path.name} has "
                f"{ref.spatial_shape}",
                "resample it onto the reference image's grid (or export both from the same series)",
            )
        ]
    dist = affine_displacement_mm(ref.affine, other.affine, ref.spatial_shape)
    if dist <= tolerance_mm:
        return []
    return [
        _problem(
            ProblemKind.AFFINE_MISMATCH,
            case_id,
            path,
            f"{what} is placed up to {dist:.2f} mm away from {ref_path.name} in world space "
            f"(tolerance {tolerance_mm:g} mm)",
            "register/resample it onto the reference image, or fix its header (origin/direction)",
        )
    ]


def check_label_values(
    case_id: str, path: Path, array: np.ndarray, labels: Mapping[int, str]
) -> tuple[list[Problem], dict[int, float]]:
    """Integer, declared label values.

    Returns:
        The problems and, when the values are valid integers, the volume fraction of each
        value present.
    """
    if not np.all(np.isfinite(array)):
        return check_finite(case_id, path, array, "the label map"), {}
    frac = array != np.round(array)
    if frac.any():
        examples = np.unique(array[frac])[:5].tolist()
        return [
            _problem(
                ProblemKind.LABEL_NON_INTEGER,
                case_id,
                path,
                f"label map has non-integer values, e.g. {examples}",
                "write labels as integers (nearest-neighbour resampling, no interpolation)",
            )
        ], {}
    ints = array.astype(np.int64).ravel()
    if ints.size and ints.min() >= 0 and ints.max() < 65536:
        counts = np.bincount(ints)
        values = np.flatnonzero(counts)
        count_of = {int(v): int(counts[v]) for v in values}
    else:
        vals, cnts = np.unique(ints, return_counts=True)
        count_of = {int(v): int(n) for v, n in zip(vals, cnts, strict=True)}
    fractions = {v: n / max(ints.size, 1) for v, n in count_of.items()}
    if labels:
        undeclared = sorted(v for v in count_of if v not in labels)
        if undeclared:
            return [
                _problem(
                    ProblemKind.LABEL_UNDECLARED,
                    case_id,
                    path,
                    f"label values {undeclared[:10]} are not declared (declared: {dict(labels)})",
                    "remap them to declared labels or add them to the config's labels",
                )
            ], fractions
    return [], fractions


# -- aggregates of a valid case -------------------------------------------------------------


def intensity_stats(channel: np.ndarray) -> dict[str, float]:
    """Percentiles, mean and std of one ``(X, Y, Z)`` channel over its nonzero voxels.

    Returns:
        ``{"p00.5", "p50", "p99.5", "mean", "std"}`` (all voxels when none is nonzero).
    """
    fg = channel[channel != 0]
    if fg.size == 0:
        fg = channel.ravel()
    p = np.percentile(fg.astype(np.float64), [0.5, 50.0, 99.5])
    return {
        "p00.5": float(p[0]),
        "p50": float(p[1]),
        "p99.5": float(p[2]),
        "mean": float(fg.mean(dtype=np.float64)),
        "std": float(fg.std(dtype=np.float64)),
    }


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes (e.g. ``"RAS"``, ``"LPS"``) of a ``(4, 4)`` voxel-to-RAS affine."""
    import nibabel as nib

    return "".join(str(c) for c in nib.aff2axcodes(affine))
