"""The site fingerprint: what a site may share with the coordinator about its data.

Median shape and spacing, orientation counts, mean intensity percentiles and label
fractions -- aggregates only, rounded, and only over at least ``min_cases`` valid cases (the
site policy's k): never a voxel, a case id, or one case's shape or spacing -- so that the
target spacing can be planned (:func:`fedmed.data.planning.plan_target_spacing`) without
anything patient-level leaving a site. With fewer valid cases than k the statistics are
withheld (``null``) and ``withheld`` says why.

One file name (:data:`FINGERPRINT_NAME`, next to the site's data), one builder
(:func:`build_fingerprint`, from a check report), one writer (:func:`write_fingerprint`) and
one loader (:func:`load_fingerprint`; :func:`load_site_fingerprints` for every training site
of a federation config).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.data.check.problems import CaseReport, SiteReport
from fedmed.data.check.runner import matched_modalities
from fedmed.data.formats import SiteManifest
from fedmed.errors import ConfigError, DatasetFormatError

if TYPE_CHECKING:
    from fedmed.config import FederationConfig

FINGERPRINT_NAME = "fingerprint.json"
"""The fingerprint's file name in a site folder (``fedmed data check`` writes it there)."""
FINGERPRINT_KEYS = (
    "site",
    "format",
    "num_cases",
    "num_valid",
    "modalities",
    "missing_modalities",
    "min_cases",
    "median_shape",
    "median_spacing",
    "orientations",
    "intensity_percentiles",
    "label_fractions",
    "fedmed_version",
)
PERCENTILE_KEYS = ("p00.5", "p50", "p99.5", "mean", "std")


def rounded(v: float, nd: int = 4) -> float:
    """``v`` as a plain float rounded to ``nd`` decimals (fingerprints carry no noise digits)."""
    return float(round(float(v), nd))


def build_fingerprint(
    manifest: SiteManifest,
    reports: SiteReport | Sequence[CaseReport],
    labels: Mapping[int, str] | None = None,
    *,
    min_cases: int = 1,
) -> dict[str, Any]:
    """The site's shareable summary: rounded aggregates over at least ``min_cases`` cases.

    Statistics come from the valid cases; counts cover all cases.

    Args:
        manifest: the site's manifest.
        reports: :func:`fedmed.data.check.check_site`'s report (or its case reports).
        labels: label names (default the report's, else the manifest's).
        min_cases: k: with fewer valid cases, every statistic is withheld.

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
        modalities = matched_modalities(manifest)
        lab = dict(labels if labels is not None else manifest.labels)
    stats = [r.stats for r in case_reports if r.valid and r.stats is not None]
    missing = Counter(m for r in case_reports for m in r.missing)
    withheld = len(stats) < min_cases
    if withheld:
        stats = []
    spacings = [[rounded(s) for s in st.spacing] for st in stats]
    median = [rounded(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None
    shape = ([int(round(v)) for v in np.median(np.asarray([st.shape for st in stats]), axis=0)]
             if stats else None)
    intensity: dict[str, dict[str, float]] = {}
    for m in modalities:
        per_case = [st.intensity[m] for st in stats if m in st.intensity]
        if per_case:
            intensity[m] = {
                k: rounded(float(np.mean([pc[k] for pc in per_case])), 6) for k in PERCENTILE_KEYS
            }
    fractions: dict[str, float] = {}
    values = sorted(set(lab) | {v for st in stats for v in st.label_fractions})
    labelled = [st for st in stats if st.label_fractions]
    for v in values:
        if labelled:
            mean = float(np.mean([st.label_fractions.get(v, 0.0) for st in labelled]))
            fractions[lab.get(v, str(v))] = rounded(mean, 6)
    fp: dict[str, Any] = {
        "site": manifest.name,
        "format": manifest.format,
        "num_cases": len(case_reports),
        "num_valid": sum(r.valid for r in case_reports),
        "modalities": list(modalities),
        "missing_modalities": {m: int(missing.get(m, 0)) for m in modalities},
        "min_cases": int(min_cases),
        "median_shape": shape,
        "median_spacing": median,
        "orientations": dict(Counter(st.orientation for st in stats)),
        "intensity_percentiles": intensity,
        "label_fractions": fractions,
        "fedmed_version": __version__,
    }
    if withheld:
        fp["withheld"] = (
            f"fewer than {min_cases} valid cases (the site policy's k): statistics withheld"
        )
    return fp


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


def load_site_fingerprints(cfg: FederationConfig) -> list[dict[str, Any]]:
    """The fingerprint of every training site of ``cfg`` (``<site>/fingerprint.json``).

    Raises:
        ConfigError: a site has no fingerprint (the message lists which, and how to make them).
        DatasetFormatError: a fingerprint is unreadable or incomplete.
    """
    paths = [cfg.site_dir(name) / FINGERPRINT_NAME for name in cfg.site_names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            "preprocessing.target_spacing is not set and it cannot be planned: missing "
            f"fingerprints {missing}; run `fedmed data check` on each site or set "
            "preprocessing.target_spacing: [sx, sy, sz] (mm) in the config"
        )
    return [load_fingerprint(p) for p in paths]
