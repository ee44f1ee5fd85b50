"""Per-case and per-site runners: the library behind ``fedmed data check``.

A site is checked case by case and never stops at the first bad case: :func:`check_case`
composes the rules of :mod:`fedmed.data.check.rules`, reading each file once;
:func:`check_site` runs every case and folds in the manifest problems that
:func:`fedmed.data.formats.load_site` collected (duplicate case ids, paths escaping the site
folder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedmed.data.check.problems import CaseReport, CaseStats, Problem, ProblemKind, SiteReport
from fedmed.data.check.rules import (
    CheckSettings,
    check_channels,
    check_geometry,
    check_label_present,
    check_label_values,
    check_manifest_problems,
    check_modalities,
    check_not_constant,
    check_readable,
    intensity_stats,
    orientation_code,
)
from fedmed.data.formats import Case, ManifestProblem, SiteManifest
from fedmed.data.io import Image

_Channels = dict[str, tuple[Path, Image, np.ndarray]]
"""Modality -> (its file, the file's image, its ``(X, Y, Z)`` channel)."""


def _read_files(
    case: Case, settings: CheckSettings
) -> tuple[dict[Path, Image | None], list[Problem]]:
    """Every distinct file of the case, read once (a 4D MSD file backs several modalities)."""
    images: dict[Path, Image | None] = {}
    problems: list[Problem] = []
    for path in case.files():
        image, errs = check_readable(case.case_id, path, settings)
        images[path] = image
        problems += errs
    return images, problems


def _modality_channels(
    case: Case, images: Mapping[Path, Image | None], num_declared: int
) -> tuple[_Channels, list[Problem]]:
    """The ``(X, Y, Z)`` channel of each readable modality whose file has the right channels."""
    channels: _Channels = {}
    problems: list[Problem] = []
    channel_ok: dict[Path, bool] = {}
    for modality, mf in case.images.items():
        image = images.get(mf.path)
        if image is None:
            continue
        if mf.path not in channel_ok:  # one report per file, not per modality it backs
            errs = check_channels(case.case_id, mf.path, image, mf.channel, num_declared)
            problems += errs
            channel_ok[mf.path] = not errs
        if channel_ok[mf.path]:
            channels[modality] = (mf.path, image, image.array[mf.channel or 0])
    return channels, problems


def _check_intensities(
    case_id: str, channels: _Channels
) -> tuple[dict[str, dict[str, float]], list[Problem]]:
    """Non-constant channels, and the intensity statistics of the good ones.

    Non-finite voxels never get here: the reader refuses them (:func:`check_readable`).
    """
    intensity: dict[str, dict[str, float]] = {}
    problems: list[Problem] = []
    for modality, (path, _, arr) in channels.items():
        errs = check_not_constant(case_id, path, arr, f"modality {modality!r}")
        problems += errs
        if not errs:
            intensity[modality] = intensity_stats(arr)
    return intensity, problems


def _check_alignment(
    case_id: str, channels: _Channels, tolerance_mm: float
) -> tuple[tuple[Path, Image] | None, list[Problem]]:
    """The case's reference image (its first readable modality) and who disagrees with it."""
    ref: tuple[Path, Image] | None = None
    problems: list[Problem] = []
    for path, image, _ in channels.values():
        if ref is None:
            ref = (path, image)
        elif path != ref[0]:
            problems += check_geometry(
                case_id, ref[0], ref[1], path, image, "this image", tolerance_mm
            )
    return ref, problems


def _check_label(
    case: Case,
    label_img: Image | None,
    labels: Mapping[int, str],
    ref: tuple[Path, Image] | None,
    tolerance_mm: float,
) -> tuple[dict[int, float], list[Problem]]:
    """One channel, declared integer values, on the reference grid; the label fractions."""
    if case.label is None or label_img is None:
        return {}, []
    if label_img.array.shape[0] != 1:
        return {}, check_channels(case.case_id, case.label, label_img, None, 1)
    problems, fractions = check_label_values(
        case.case_id, case.label, label_img.array[0], labels
    )
    if ref is not None:
        problems += check_geometry(
            case.case_id, ref[0], ref[1], case.label, label_img, "the label map", tolerance_mm
        )
    return fractions, problems


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
    images, errs = _read_files(case, st)
    problems += errs
    num_declared = (
        len(declared_modalities) if declared_modalities else len(case.images) + len(case.missing)
    )
    channels, errs = _modality_channels(case, images, num_declared)
    problems += errs
    intensity, errs = _check_intensities(cid, channels)
    problems += errs
    ref, errs = _check_alignment(cid, channels, st.affine_tolerance_mm)
    problems += errs
    label_img = images.get(case.label) if case.label is not None else None
    fractions, errs = _check_label(case, label_img, labels, ref, st.affine_tolerance_mm)
    problems += errs

    report = CaseReport(cid, problems, None, tuple(case.missing))
    if report.valid and ref is not None:
        report.stats = CaseStats(
            shape=ref[1].spatial_shape,
            spacing=ref[1].spacing,
            orientation=orientation_code(ref[1].affine),
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
    expected = tuple(expected_modalities) if expected_modalities else matched_modalities(manifest)
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
    orphans = dict.fromkeys(mp.case_id for mp in manifest.problems if mp.case_id not in listed)
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


def matched_modalities(manifest: SiteManifest) -> tuple[str, ...]:
    """The modalities the manifest's cases were matched against (``load_site``'s list)."""
    for c in manifest.cases:
        # images + missing partition the expected list, in order of the missing tuple.
        names = list(c.images) + [m for m in c.missing if m not in c.images]
        if names:
            order = {m: i for i, m in enumerate(manifest.modalities)}
            return tuple(sorted(names, key=lambda m: order.get(m, len(order))))
    return manifest.modalities
