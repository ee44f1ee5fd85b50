"""Site checks and fingerprints: the library behind ``fedmed data check``.

A site is checked case by case and never stops at the first bad case: every problem becomes a
:class:`Problem` (``kind``, ``file``, ``message``) that names the case, the file, what is wrong
and how to fix it. Small single-purpose check functions each return a list of problems;
:func:`check_case` composes them, reading each file once; :func:`check_site` runs every case
and folds in the manifest problems that :func:`fedmed.data.formats.load_site` collected
(duplicate case ids, paths escaping the site folder).

The fingerprint (:func:`fingerprint`) is what a site may share with the coordinator: shapes,
spacings, orientations, intensity percentiles and label fractions -- aggregates only, never
voxel arrays -- so that the coordinator can plan the target spacing
(:func:`plan_target_spacing`) without any voxel leaving a site.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.formats import Case, ManifestProblem, SiteManifest
from fedmed.data.io import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    SITK_SUFFIXES,
    Image,
    image_suffix,
    read_image,
    world_coordinates,
)
from fedmed.errors import DatasetFormatError, ImageReadError, PreprocessingError

FINGERPRINT_NAME = "fingerprint.json"
FINGERPRINT_KEYS = (
    "site",
    "format",
    "num_cases",
    "num_valid",
    "modalities",
    "missing_modalities",
    "shapes",
    "spacings",
    "median_spacing",
    "orientations",
    "intensity_percentiles",
    "label_fractions",
    "fedmed_version",
)
PERCENTILE_KEYS = ("p00.5", "p50", "p99.5", "mean", "std")


class ProblemKind(str, Enum):
    """What is wrong; one value per problem type so that tests and tools can match exactly."""

    MISSING_FILE = "missing_file"
    """A file the manifest names does not exist."""
    MISSING_MODALITY = "missing_modality"
    """The case lacks a modality its own site declares (a lost or deleted file)."""
    ABSENT_MODALITY = "absent_modality"
    """The case lacks a modality the federation expects but the site never had (warning)."""
    UNEXPECTED_MODALITY = "unexpected_modality"
    """The case has a modality the federation does not use; it is ignored (warning)."""
    NO_LABEL = "no_label"
    """The manifest names no label map for the case (warning: usable for inference only)."""
    NOT_AN_IMAGE = "not_an_image"
    """Unsupported suffix, or the header cannot be parsed: not an image file."""
    CORRUPT = "corrupt"
    """The header is readable but the voxel data are truncated or damaged."""
    NOT_3D = "not_3d"
    """2D, 5D+, or a multi-channel file where one 3D volume is expected."""
    CHANNEL_MISMATCH = "channel_mismatch"
    """A 4D multi-modality file whose channel count disagrees with the declared modalities."""
    TOO_LARGE = "too_large"
    """More megavoxels per channel than the configured limit."""
    SHAPE_MISMATCH = "shape_mismatch"
    """Spatial shape differs between modalities or between an image and its label."""
    AFFINE_MISMATCH = "affine_mismatch"
    """Voxel grids more than the tolerance apart in world space."""
    NON_FINITE = "non_finite"
    """NaN or infinite voxels."""
    CONSTANT_IMAGE = "constant_image"
    """Every voxel has the same value: an empty or failed export."""
    LABEL_NON_INTEGER = "label_non_integer"
    """Label map with fractional values (an interpolated or probability map)."""
    LABEL_UNDECLARED = "label_undeclared"
    """Label values that the federation's (or site's) label list does not declare."""
    DUPLICATE_CASE = "duplicate_case"
    """Two cases share an id."""
    PATH_ESCAPES_SITE = "path_escapes_site"
    """The manifest names a file outside the site folder."""
    MANIFEST = "manifest"
    """Any other manifest problem (malformed entry, bad file name)."""


WARNING_KINDS = frozenset(
    {ProblemKind.ABSENT_MODALITY, ProblemKind.UNEXPECTED_MODALITY, ProblemKind.NO_LABEL}
)


@dataclass(frozen=True)
class Problem:
    """One problem of one case.

    Attributes:
        kind: the problem type.
        file: the file concerned (``""`` for case-level problems).
        message: names the case, the file, what is wrong and how to fix it.
    """

    kind: ProblemKind
    file: str
    message: str

    @property
    def is_error(self) -> bool:
        """Whether the problem makes the case invalid (else it is a warning)."""
        return self.kind not in WARNING_KINDS

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {
            "kind": self.kind.value,
            "severity": "error" if self.is_error else "warning",
            "file": self.file,
            "message": self.message,
        }


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


@dataclass(frozen=True)
class CaseStats:
    """Aggregates of one case for the fingerprint (no voxel arrays)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    intensity: dict[str, dict[str, float]]
    """Modality -> ``{"p00.5", "p50", "p99.5", "mean", "std"}`` over nonzero voxels."""
    label_fractions: dict[int, float]
    """Label value -> volume fraction."""


@dataclass
class CaseReport:
    """The result of checking one case."""

    case_id: str
    problems: list[Problem] = field(default_factory=list)
    stats: CaseStats | None = None
    missing: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        """No error-level problem (warnings allowed)."""
        return not any(p.is_error for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        """The problems that make the case invalid."""
        return [p for p in self.problems if p.is_error]

    @property
    def kinds(self) -> set[ProblemKind]:
        """The kinds of every problem of the case."""
        return {p.kind for p in self.problems}

    @property
    def status(self) -> str:
        """``valid``, ``warning`` (valid with warnings) or ``invalid``."""
        if not self.valid:
            return "invalid"
        return "warning" if self.problems else "valid"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (problems only; statistics go to the fingerprint)."""
        return {
            "case_id": self.case_id,
            "status": self.status,
            "valid": self.valid,
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass
class SiteReport:
    """The result of checking a whole site."""

    site: str
    root: Path
    format: str
    modalities: tuple[str, ...]
    labels: dict[int, str]
    cases: list[CaseReport]
    problems: list[Problem] = field(default_factory=list)
    """Site-level problems (e.g. a site without cases)."""

    @property
    def valid(self) -> bool:
        """Every case valid, no site-level problem, and at least one case."""
        return bool(self.cases) and not self.problems and all(c.valid for c in self.cases)

    @property
    def num_valid(self) -> int:
        """Number of valid cases."""
        return sum(c.valid for c in self.cases)

    def case(self, case_id: str) -> CaseReport:
        """The report of case ``case_id``."""
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetFormatError(f"site {self.site}: no case {case_id!r} in the report")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "site": self.site,
            "root": str(self.root),
            "format": self.format,
            "valid": self.valid,
            "num_cases": len(self.cases),
            "num_valid": self.num_valid,
            "modalities": list(self.modalities),
            "problems": [p.to_dict() for p in self.problems],
            "cases": [c.to_dict() for c in self.cases],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)


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


def _peek_shape(path: Path) -> tuple[tuple[int, ...], str] | None:
    """``(shape, reader)`` from the header alone, or ``None`` if the header cannot be read.

    Reading only the header lets the size and dimension checks refuse a huge or 2D file
    before its voxels are loaded.
    """
    suffix = image_suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            img: Any = nib.load(str(path))  # header only: voxels are not read here
            return tuple(int(s) for s in img.shape), "nifti"
        if suffix in SITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = tuple(int(s) for s in reader.GetSize())
            comps = int(reader.GetNumberOfComponents())
            return (size + (comps,) if comps > 1 else size), "sitk"
    except Exception:  # any parse failure means "not readable as an image header"
        return None
    return None


def _spatial_dims_ok(shape: tuple[int, ...], reader: str) -> bool:
    if reader == "nifti":
        return len(shape) in (3, 4) or (len(shape) == 5 and shape[3] == 1)
    # ITK: 3 spatial dims, components (if any) appended by _peek_shape.
    return len(shape) in (3, 4)


def check_readable(
    case_id: str, path: Path, settings: CheckSettings
) -> tuple[Image | None, list[Problem]]:
    """Read one file, refusing missing, non-image, non-3D, oversized or corrupt files.

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
    peek = None if path.is_dir() else _peek_shape(path)
    if peek is not None:
        shape, reader = peek
        if not _spatial_dims_ok(shape, reader):
            return None, [
                _problem(
                    ProblemKind.NOT_3D,
                    case_id,
                    path,
                    f"expected a 3D volume (or 4D with channels last), got shape {shape}",
                    "export one 3D volume per modality",
                )
            ]
        megavoxels = float(np.prod(shape[:3], dtype=np.float64)) / 1e6
        if megavoxels > settings.max_megavoxels:
            return None, [
                _problem(
                    ProblemKind.TOO_LARGE,
                    case_id,
                    path,
                    f"{megavoxels:.1f} megavoxels per channel (shape {shape[:3]}) exceeds the "
                    f"limit of {settings.max_megavoxels:g}",
                    "crop or downsample it, or raise --max-megavoxels / "
                    "preprocessing.max_case_megavoxels",
                )
            ]
    try:
        return read_image(path), []
    except ImageReadError as exc:
        reason = str(exc)
        prefix = f"{path}: "
        reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
        if peek is not None or path.is_dir():
            kind, what = ProblemKind.CORRUPT, "the header is readable but the voxel data are not"
        else:
            kind, what = ProblemKind.NOT_AN_IMAGE, "cannot be parsed as an image"
        return None, [
            _problem(
                kind,
                case_id,
                path,
                f"{what} ({reason})",
                "re-export or re-copy the file from its source",
            )
        ]


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


# -- composition ---------------------------------------------------------------------------


def _intensity_stats(channel: np.ndarray) -> dict[str, float]:
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


def _orientation(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(str(c) for c in nib.aff2axcodes(affine))


def check_case(
    case: Case,
    labels: Mapping[int, str],
    settings: CheckSettings | None = None,
    *,
    declared_modalities: Sequence[str] | None = None,
    manifest_problems: Sequence[ManifestProblem] = (),
) -> CaseReport:
    """Run every check on one case, reading each file once.

    Args:
        case: the case from the manifest.
        labels: declared labels (value -> name); empty: only integrality is checked.
        settings: thresholds (default :class:`CheckSettings`).
        declared_modalities: the modalities the site itself declares (in the federation's
            spelling): a missing one is an error, a missing federation-only one a warning, and
            a 4D multi-modality file must have this many channels. Default: every modality
            of the case is declared.
        manifest_problems: the site's manifest problems; those of this case are included.

    Returns:
        The report; never raises for a bad case.
    """
    st = settings or CheckSettings()
    cid = case.case_id
    problems = check_manifest_problems(cid, manifest_problems)
    problems += check_modalities(case, declared_modalities, st)
    problems += check_label_present(case)

    # Read every distinct file once: a 4D MSD file backs several modalities.
    cache: dict[Path, Image | None] = {}
    for path in case.files():
        image, errs = check_readable(cid, path, st)
        cache[path] = image
        problems += errs

    num_declared = (
        len(declared_modalities) if declared_modalities else len(case.images) + len(case.missing)
    )
    channels: dict[str, tuple[Path, Image, np.ndarray]] = {}
    channel_ok: dict[Path, bool] = {}
    for modality, mf in case.images.items():
        image = cache.get(mf.path)
        if image is None:
            continue
        if mf.path not in channel_ok:  # one report per file, not per modality it backs
            errs = check_channels(cid, mf.path, image, mf.channel, num_declared)
            problems += errs
            channel_ok[mf.path] = not errs
        if channel_ok[mf.path]:
            channels[modality] = (mf.path, image, image.array[mf.channel or 0])

    intensity: dict[str, dict[str, float]] = {}
    for modality, (path, _, arr) in channels.items():
        what = f"modality {modality!r}"
        errs = check_finite(cid, path, arr, what)
        if not errs:
            errs = check_not_constant(cid, path, arr, what)
        problems += errs
        if not errs:
            intensity[modality] = _intensity_stats(arr)

    # The first readable modality is the geometry reference of the case.
    ref: tuple[Path, Image] | None = None
    for path, image, _ in channels.values():
        if ref is None:
            ref = (path, image)
        elif path != ref[0]:
            problems += check_geometry(
                cid, ref[0], ref[1], path, image, "this image", st.affine_tolerance_mm
            )

    fractions: dict[int, float] = {}
    label_img = cache.get(case.label) if case.label is not None else None
    if case.label is not None and label_img is not None:
        if label_img.array.shape[0] != 1:
            problems += check_channels(cid, case.label, label_img, None, 1)
        else:
            errs, fractions = check_label_values(cid, case.label, label_img.array[0], labels)
            problems += errs
            if ref is not None:
                problems += check_geometry(
                    cid,
                    ref[0],
                    ref[1],
                    case.label,
                    label_img,
                    "the label map",
                    st.affine_tolerance_mm,
                )

    report = CaseReport(cid, problems, None, tuple(case.missing))
    if report.valid and ref is not None:
        report.stats = CaseStats(
            shape=ref[1].spatial_shape,
            spacing=ref[1].spacing,
            orientation=_orientation(ref[1].affine),
            intensity=intensity,
            label_fractions=fractions,
        )
    return report


def check_site(
    manifest: SiteManifest,
    labels: Mapping[int, str] | None = None,
    settings: CheckSettings | None = None,
    expected_modalities: Sequence[str] | None = None,
) -> SiteReport:
    """Check every case of a site, never stopping at a bad one.

    Args:
        manifest: from :func:`fedmed.data.formats.load_site`.
        labels: the federation's labels; default the site's own declaration.
        settings: thresholds (default :class:`CheckSettings`).
        expected_modalities: the list ``load_site`` matched the cases against (the
            federation's); default: inferred from the manifest's cases.

    Returns:
        The site report; manifest problems of cases the manifest could not list (e.g. a
        malformed entry) become reports of their own, so they are never lost.
    """
    lab = dict(labels) if labels is not None else dict(manifest.labels)
    st = settings or CheckSettings()
    # The modalities the cases were matched against (load_site's expected list).
    expected = tuple(expected_modalities) if expected_modalities else _expected_modalities(manifest)
    cases = [
        check_case(
            c,
            lab,
            st,
            declared_modalities=manifest.modalities,
            manifest_problems=manifest.problems,
        )
        for c in manifest.cases
    ]
    listed = {c.case_id for c in manifest.cases}
    orphans: dict[str, list[Problem]] = {}
    for mp in manifest.problems:
        if mp.case_id not in listed:
            orphans.setdefault(mp.case_id, [])
    for cid in orphans:
        cases.append(CaseReport(cid, check_manifest_problems(cid, manifest.problems)))
    site_problems = []
    if not manifest.cases:
        site_problems.append(
            Problem(
                ProblemKind.MANIFEST,
                str(manifest.root),
                f"site {manifest.name!r} ({manifest.root}): the manifest lists no cases; add "
                "cases or point to the right folder",
            )
        )
    return SiteReport(
        site=manifest.name,
        root=manifest.root,
        format=manifest.format,
        modalities=expected,
        labels=lab,
        cases=cases,
        problems=site_problems,
    )


def _expected_modalities(manifest: SiteManifest) -> tuple[str, ...]:
    """The modalities the manifest's cases were matched against."""
    for c in manifest.cases:
        # images + missing partition the expected list, in order of the missing tuple.
        names = list(c.images) + [m for m in c.missing if m not in c.images]
        if names:
            order = {m: i for i, m in enumerate(manifest.modalities)}
            return tuple(sorted(names, key=lambda m: order.get(m, len(order))))
    return manifest.modalities


# -- fingerprint ---------------------------------------------------------------------------


def _round(v: float, nd: int = 4) -> float:
    return float(round(float(v), nd))


def fingerprint(
    manifest: SiteManifest,
    reports: SiteReport | Sequence[CaseReport],
    labels: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """The site's shareable summary: aggregates only, never voxel arrays.

    Statistics come from the valid cases; counts cover all cases.

    Args:
        manifest: the site's manifest.
        reports: :func:`check_site`'s report (or its case reports).
        labels: label names (default the report's, else the manifest's).

    Returns:
        A JSON-ready dict with the keys of :data:`FINGERPRINT_KEYS`.
    """
    from fedmed import __version__

    if isinstance(reports, SiteReport):
        case_reports = list(reports.cases)
        modalities = reports.modalities
        lab = dict(labels if labels is not None else reports.labels)
    else:
        case_reports = list(reports)
        modalities = _expected_modalities(manifest)
        lab = dict(labels if labels is not None else manifest.labels)
    stats = [r.stats for r in case_reports if r.valid and r.stats is not None]
    missing = Counter(m for r in case_reports for m in r.missing)
    spacings = [[_round(s) for s in st.spacing] for st in stats]
    median = [_round(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None
    intensity: dict[str, dict[str, float]] = {}
    for m in modalities:
        per_case = [st.intensity[m] for st in stats if m in st.intensity]
        if per_case:
            intensity[m] = {
                k: _round(float(np.mean([pc[k] for pc in per_case])), 6) for k in PERCENTILE_KEYS
            }
    fractions: dict[str, float] = {}
    values = sorted(set(lab) | {v for st in stats for v in st.label_fractions})
    labelled = [st for st in stats if st.label_fractions]
    for v in values:
        if labelled:
            mean = float(np.mean([st.label_fractions.get(v, 0.0) for st in labelled]))
            fractions[lab.get(v, str(v))] = _round(mean, 6)
    return {
        "site": manifest.name,
        "format": manifest.format,
        "num_cases": len(case_reports),
        "num_valid": sum(r.valid for r in case_reports),
        "modalities": list(modalities),
        "missing_modalities": {m: int(missing.get(m, 0)) for m in modalities},
        "shapes": [list(st.shape) for st in stats],
        "spacings": spacings,
        "median_spacing": median,
        "orientations": dict(Counter(st.orientation for st in stats)),
        "intensity_percentiles": intensity,
        "label_fractions": fractions,
        "fedmed_version": __version__,
    }


def write_fingerprint(fp: Mapping[str, Any], path: str | Path) -> Path:
    """Write a fingerprint as JSON.

    Raises:
        DatasetFormatError: the file cannot be written.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(fp, indent=2) + "\n")
    except OSError as exc:
        raise DatasetFormatError(
            f"{p}: cannot write the fingerprint ({exc}); pass --fingerprint with a writable path"
        ) from None
    return p


def load_fingerprint(path: str | Path) -> dict[str, Any]:
    """Read a fingerprint written by ``fedmed data check``.

    Raises:
        DatasetFormatError: missing file, invalid JSON, or missing keys.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{p}: fingerprint not found; run `fedmed data check SITE_DIR` at the site first"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(
            f"{p}: not a readable fingerprint JSON ({exc}); re-run `fedmed data check`"
        ) from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{p}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in FINGERPRINT_KEYS if k not in data]
    if missing:
        raise DatasetFormatError(
            f"{p}: fingerprint lacks keys {missing}; re-run `fedmed data check` with this "
            "fedmed version"
        )
    return data


def plan_target_spacing(fingerprints: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
    """The target spacing for the federation: median across sites of their median spacings.

    Args:
        fingerprints: one per site (from :func:`load_fingerprint`); sites without a valid
            case (``median_spacing`` null) are skipped.

    Returns:
        ``(sx, sy, sz)`` in mm, rounded to 0.01 mm.

    Raises:
        PreprocessingError: no fingerprint has a median spacing.
        DatasetFormatError: a fingerprint's ``median_spacing`` is malformed.
    """
    medians = []
    for i, fp in enumerate(fingerprints):
        ms = fp.get("median_spacing")
        if ms is None:
            continue
        try:
            triple = [float(v) for v in ms]
        except (TypeError, ValueError):
            triple = []
        if len(triple) != 3 or not all(np.isfinite(triple)) or min(triple) <= 0:
            raise DatasetFormatError(
                f"fingerprint {i} (site {fp.get('site')!r}): median_spacing must be 3 positive "
                f"numbers (mm), got {ms!r}; re-run `fedmed data check` at that site"
            )
        medians.append(triple)
    if not medians:
        raise PreprocessingError(
            "cannot plan the target spacing: no site fingerprint has a valid case; run "
            "`fedmed data check` at each site, fix the reported cases, or set "
            "preprocessing.target_spacing in the config"
        )
    med = np.median(np.asarray(medians), axis=0)
    return (_round(med[0], 2), _round(med[1], 2), _round(med[2], 2))
