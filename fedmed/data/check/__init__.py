"""Site checks: problem kinds and reports, the check rules, and the per-case/per-site runners.

``problems`` holds what a check reports, ``rules`` the single-purpose checks, ``runner`` the
composition (:func:`check_case`, :func:`check_site`). The fingerprint a check writes lives in
:mod:`fedmed.data.fingerprint`.
"""

from fedmed.data.check.problems import (
    WARNING_KINDS,
    CaseReport,
    CaseStats,
    Problem,
    ProblemKind,
    SiteReport,
)
from fedmed.data.check.rules import CheckSettings, affine_displacement_mm
from fedmed.data.check.runner import check_case, check_site, matched_modalities

__all__ = [
    "WARNING_KINDS",
    "CaseReport",
    "CaseStats",
    "CheckSettings",
    "Problem",
    "ProblemKind",
    "SiteReport",
    "affine_displacement_mm",
    "check_case",
    "check_site",
    "matched_modalities",
]
