"""`fedmed data check`'s rules: each bad input is reported with its own problem kind."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from fedmed.data.check import ProblemKind, affine_displacement_mm
from fedmed.data.formats import load_site
from tests.support import bad_images
from tests.support.corruptions import (
    cases_by_id,
    copy_site,
    error_kinds,
    rewrite,
    run_check,
    shift_5mm,
    truncate,
)

# -- one bad input at a time ----------------------------------------------------------------


def _write_text(p: Path) -> None:
    p.write_text("this is a radiology report, not an image\n")


def _replace_nifti(p: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    aff = nib.load(str(p)).affine if affine is None else affine
    nib.save(nib.Nifti1Image(data, aff), str(p))


def _edit_manifest(site: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((site / "dataset.json").read_text())
    fn(meta)
    (site / "dataset.json").write_text(json.dumps(meta))


# (id, format, corruption, bad case, expected error kinds, extra CLI args)
BAD_INPUTS: list[tuple[str, str, Callable[[Path], None], str, set[ProblemKind], list[str]]] = [
    (
        "missing-label",
        "folder",
        lambda s: (s / "case_001/label.nii.gz").unlink(),
        "case_001",
        {ProblemKind.MISSING_FILE},
        [],
    ),
    (
        "missing-modality",
        "folder",
        lambda s: (s / "case_001/T2.nii.gz").unlink(),
        "case_001",
        {ProblemKind.MISSING_MODALITY},
        [],
    ),
    (
        "truncated",
        "folder",
        lambda s: truncate(s / "case_001/FLAIR.nii.gz"),
        "case_001",
        {ProblemKind.CORRUPT},
        [],
    ),
    (
        "text-file-as-nifti",
        "folder",
        lambda s: _write_text(s / "case_001/T1.nii.gz"),
        "case_001",
        {ProblemKind.NOT_AN_IMAGE},
        [],
    ),
    (
        "unsupported-suffix",
        "msd-split",
        lambda s: (
            _write_text(s / "imagesTr/notes.txt"),
            _edit_manifest(
                s, lambda m: m["training"][1]["image"].__setitem__(0, "imagesTr/notes.txt")
            ),
        ),
        "case_001",
        {ProblemKind.NOT_AN_IMAGE},
        [],
    ),
    (
        "2d-image",
        "folder",
        lambda s: _replace_nifti(s / "case_001/T1.nii.gz", np.ones((16, 16), np.float32)),
        "case_001",
        {ProblemKind.NOT_3D},
        [],
    ),
    (
        "4d-where-3d-expected",
        "folder",
        lambda s: _replace_nifti(
            s / "case_001/T1.nii.gz", np.random.default_rng(0).random((17, 17, 17, 2))
        ),
        "case_001",
        {ProblemKind.NOT_3D},
        [],
    ),
    (
        "channel-count",
        "msd",
        lambda s: rewrite(s / "imagesTr/case_001.nii.gz", lambda a: a[..., :2]),
        "case_001",
        {ProblemKind.CHANNEL_MISMATCH},
        [],
    ),
    (
        "shape-mismatch",
        "folder",
        lambda s: rewrite(s / "case_001/T2.nii.gz", lambda a: a[:-2]),
        "case_001",
        {ProblemKind.SHAPE_MISMATCH},
        [],
    ),
    (
        "modality-affine",
        "folder",
        lambda s: rewrite(s / "case_001/T2.nii.gz", lambda a: a, shift_5mm),
        "case_001",
        {ProblemKind.AFFINE_MISMATCH},
        [],
    ),
    (
        "rotated-label",
        "folder",
        # Same origin, 90 degree rotation: corners move far apart in world space.
        lambda s: rewrite(
            s / "case_001/label.nii.gz",
            lambda a: a,
            lambda aff: np.diag([1.0, -1.0, -1.0, 1.0]) @ aff,
        ),
        "case_001",
        {ProblemKind.AFFINE_MISMATCH},
        [],
    ),
    (
        "infinite",
        "folder",
        lambda s: rewrite(
            s / "case_001/FLAIR.nii.gz", lambda a: np.where(a > 250, np.inf, a).astype(np.float32)
        ),
        "case_001",
        {ProblemKind.NON_FINITE},
        [],
    ),
    (
        "singular-affine",
        "folder",
        lambda s: bad_images.zero_affine(s / "case_001/T2.nii.gz"),
        "case_001",
        {ProblemKind.BAD_AFFINE},
        [],
    ),
    (
        "huge-header-claim",
        "folder",
        # A 4 KB file whose header claims 4000^3 voxels: refused before its voxels are read.
        lambda s: bad_images.huge_header(s / "case_001/T1.nii.gz"),
        "case_001",
        {ProblemKind.TOO_LARGE},
        [],
    ),
    (
        "constant",
        "folder",
        lambda s: rewrite(s / "case_001/T1.nii.gz", lambda a: np.zeros_like(a)),
        "case_001",
        {ProblemKind.CONSTANT_IMAGE},
        [],
    ),
    (
        "fractional-label",
        "folder",
        lambda s: rewrite(s / "case_001/label.nii.gz", lambda a: a.astype(np.float32) * 0.5),
        "case_001",
        {ProblemKind.LABEL_NON_INTEGER},
        [],
    ),
    (
        "undeclared-label",
        "folder",
        lambda s: rewrite(s / "case_001/label.nii.gz", lambda a: np.where(a == 2, 7, a)),
        "case_001",
        {ProblemKind.LABEL_UNDECLARED},
        [],
    ),
    (
        "too-large",
        "folder",
        lambda s: [
            rewrite(s / f"case_001/{n}.nii.gz", lambda a: np.pad(a, ((0, 12),) * 3))
            for n in ("T1", "T2", "FLAIR", "label")
        ],
        "case_001",
        {ProblemKind.TOO_LARGE},
        ["--max-megavoxels", "0.01"],  # 16^3..18^3 pass, 28^3+ does not
    ),
    (
        "duplicate-id",
        "msd-split",
        lambda s: _edit_manifest(s, lambda m: m["training"].append(dict(m["training"][1]))),
        "case_001",
        {ProblemKind.DUPLICATE_CASE},
        [],
    ),
    (
        "path-escapes-site",
        "msd-split",
        lambda s: _edit_manifest(
            s, lambda m: m["training"][1]["image"].__setitem__(2, "../../etc/FLAIR.nii.gz")
        ),
        "case_001",
        # The escaping file is dropped, so the case also lacks that modality.
        {ProblemKind.PATH_ESCAPES_SITE, ProblemKind.MISSING_MODALITY},
        [],
    ),
]


@pytest.mark.parametrize(
    ("fmt", "corrupt", "bad_case", "kinds", "extra"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS],
)
def test_each_bad_input_has_its_own_kind(
    fmt: str,
    corrupt: Callable[[Path], None],
    bad_case: str,
    kinds: set[ProblemKind],
    extra: list[str],
    valid_sites: dict[str, Path],
    tmp_path: Path,
) -> None:
    site = copy_site(valid_sites[fmt], tmp_path / "site")
    corrupt(site)
    rc, report = run_check(site, tmp_path, *extra)
    assert rc == 1
    cases = cases_by_id(report)
    assert error_kinds(cases[bad_case]) == {k.value for k in kinds}
    assert cases[bad_case]["status"] == "invalid"
    others = [c for cid, c in cases.items() if cid != bad_case]
    assert others and all(c["status"] == "valid" for c in others)
    assert report["num_valid"] == len(others)
    # The remaining cases still load through the manifest.
    manifest = load_site(site)
    good = [c for c in manifest.cases if c.case_id != bad_case]
    assert {c.case_id for c in good} == {c["case_id"] for c in others}


def test_affine_within_tolerance_is_valid_and_tolerance_is_configurable(
    valid_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = copy_site(valid_sites["folder"], tmp_path / "site")

    def shift(aff: np.ndarray) -> np.ndarray:
        aff[:3, 3] += [0.3, 0.4, 0.0]  # 0.5 mm
        return aff

    rewrite(site / "case_002/label.nii.gz", lambda a: a, shift)
    rc, _ = run_check(site, tmp_path)
    assert rc == 0
    rc, report = run_check(site, tmp_path, "--affine-tolerance-mm", "0.25")
    assert rc == 1
    assert error_kinds(cases_by_id(report)["case_002"]) == {ProblemKind.AFFINE_MISMATCH.value}


def test_affine_displacement_measures_corner_voxels() -> None:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    assert affine_displacement_mm(a, a, (10, 10, 10)) == 0.0
    b = a.copy()
    b[:3, 3] = [0.0, 3.0, 4.0]
    assert affine_displacement_mm(a, b, (10, 10, 10)) == pytest.approx(5.0)
    # A 1% voxel-size error moves the far corner by 1% of the field of view (9 voxels * 0.02).
    c = np.diag([2.02, 2.0, 2.0, 1.0])
    assert affine_displacement_mm(a, c, (10, 10, 10)) == pytest.approx(0.18)


def test_nnunet_missing_channel_and_missing_label(
    make_site: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = make_site(tmp_path / "nn", "nnunet", n_cases=3)
    (site / "imagesTr/FED_001_0002.nii.gz").unlink()
    (site / "labelsTr/FED_002.nii.gz").unlink()
    rc, report = run_check(site, tmp_path)
    assert rc == 1
    # The table shows each problem's kind (not swallowed as rich markup) and the verdict.
    out = capsys.readouterr()
    assert "[missing_modality]" in out.out and "[missing_file]" in out.out
    assert "2 of 3 case(s) invalid" in out.err
    cases = cases_by_id(report)
    assert error_kinds(cases["FED_000"]) == set()
    assert error_kinds(cases["FED_001"]) == {ProblemKind.MISSING_MODALITY.value}
    assert "FLAIR" in cases["FED_001"]["problems"][0]["message"]
    assert error_kinds(cases["FED_002"]) == {ProblemKind.MISSING_FILE.value}


def test_manifest_entry_without_image_is_reported(
    valid_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = copy_site(valid_sites["msd-split"], tmp_path / "site")
    _edit_manifest(site, lambda m: m["training"].append({"label": "labelsTr/case_000.nii.gz"}))
    rc, report = run_check(site, tmp_path)
    assert rc == 1
    cases = cases_by_id(report)
    assert error_kinds(cases["#6"]) == {ProblemKind.MANIFEST.value}
    assert sum(c["valid"] for c in cases.values()) == 6
