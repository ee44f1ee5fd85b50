"""What ``fedmed data check`` reports: problem kinds, problems, and case and site reports.

A :class:`Problem` (``kind``, ``file``, ``message``) names the case, the file, what is wrong
and how to fix it; a :class:`CaseReport` gathers the problems of one case and, for a valid
case, its :class:`CaseStats` (aggregates only, for the fingerprint); a :class:`SiteReport`
gathers the case reports of a site.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fedmed.errors import DatasetFormatError


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
    BAD_AFFINE = "bad_affine"
    """A singular or non-finite voxel-to-world affine (zero voxel size, NaN, parallel axes)."""
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

