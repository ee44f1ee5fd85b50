"""`fedmed data check`: per-case problems, exit codes, JSON report and the site fingerprint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.data import check as check_mod
from fedmed.data.check import (
    FINGERPRINT_KEYS,
    CheckSettings,
    ProblemKind,
    affine_displacement_mm,
    check_case,
    check_site,
    fingerprint,
    load_fingerprint,
    plan_target_spacing,
)
from fedmed.data.formats import load_site
from fedmed.errors import DatasetFormatError, PreprocessingError

MODALITIES = ("T1", "T2", "FLAIR")


# -- helpers: corruptions applied to a copy of a valid site ---------------------------------


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], affine_fn: Any = None) -> None:
    """Load a NIfTI, transform its data (and optionally its affine), save it in place."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    aff = img.affine.copy() if affine_fn is None else affine_fn(img.affine.copy())
    new = nib.Nifti1Image(fn(data), aff)
    new.set_qform(aff, code=1)
    new.set_sform(aff, code=1)
    nib.save(new, str(path))


def _with_nan(a: np.ndarray) -> np.ndarray:
    out = a.astype(np.float32)
    out[2, 3, 4] = np.nan
    return out


def _shift_5mm(aff: np.ndarray) -> np.ndarray:
    aff[:3, 3] += np.array([3.0, 4.0, 0.0])  # |(3, 4, 0)| = 5 mm
    return aff


def _run_check(site: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "report.json"
    rc = main(["data", "check", str(site), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def _cases(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["case_id"]: c for c in report["cases"]}


def _error_kinds(case: dict[str, Any]) -> set[str]:
    return {p["kind"] for p in case["problems"] if p["severity"] == "error"}


@pytest.fixture(scope="module")
def valid_sites(
    tmp_path_factory: pytest.TempPathFactory, make_site: Callable[..., Path]
) -> dict[str, Path]:
    """Valid 6-case sites (folder-per-case, MSD with per-modality files), written once."""
    base = tmp_path_factory.mktemp("valid-sites")
    return {
        "folder": make_site(base / "hospital-a", "folder", n_cases=6),
        "msd-split": make_site(base / "hospital-b", "msd-split", n_cases=6),
        "msd": make_site(base / "hospital-c", "msd", n_cases=3),
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- acceptance -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["folder", "msd", "msd-split"])
def test_valid_site_exits_0_and_writes_fingerprint(
    fmt: str, valid_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = _copy(valid_sites[fmt], tmp_path / "site")
    rc, report = _run_check(site, tmp_path)
    assert rc == 0
    assert report["valid"] is True
    assert report["num_valid"] == report["num_cases"] == len(report["cases"]) > 0
    assert all(c["status"] == "valid" and c["problems"] == [] for c in report["cases"])
    fp = load_fingerprint(site / "fingerprint.json")
    assert fp["num_valid"] == fp["num_cases"] == report["num_cases"]


@pytest.mark.parametrize(
    ("fmt", "paths", "deleted_kind"),
    [
        (
            "folder",
            {
                "truncated": "case_000/T1.nii.gz",
                "nan": "case_001/T2.nii.gz",
                "label": "case_002/label.nii.gz",
                "deleted": "case_003/FLAIR.nii.gz",
            },
            ProblemKind.MISSING_MODALITY,
        ),
        (
            "msd-split",
            {
                "truncated": "imagesTr/case_000_T1.nii.gz",
                "nan": "imagesTr/case_001_T2.nii.gz",
                "label": "labelsTr/case_002.nii.gz",
                "deleted": "imagesTr/case_003_FLAIR.nii.gz",
            },
            # The manifest names the file, so its absence is a missing file.
            ProblemKind.MISSING_FILE,
        ),
    ],
)
def test_four_corruptions_exactly_four_invalid_cases(
    fmt: str,
    paths: dict[str, str],
    deleted_kind: ProblemKind,
    valid_sites: dict[str, Path],
    tmp_path: Path,
) -> None:
    site = _copy(valid_sites[fmt], tmp_path / "site")
    _truncate(site / paths["truncated"])
    _rewrite(site / paths["nan"], _with_nan)
    _rewrite(site / paths["label"], lambda a: a, _shift_5mm)
    (site / paths["deleted"]).unlink()

    rc, report = _run_check(site, tmp_path)

    assert rc == 1
    assert report["valid"] is False
    cases = _cases(report)
    invalid = {cid for cid, c in cases.items() if not c["valid"]}
    assert invalid == {"case_000", "case_001", "case_002", "case_003"}
    assert _error_kinds(cases["case_000"]) == {ProblemKind.CORRUPT.value}
    assert _error_kinds(cases["case_001"]) == {ProblemKind.NON_FINITE.value}
    assert _error_kinds(cases["case_002"]) == {ProblemKind.AFFINE_MISMATCH.value}
    assert _error_kinds(cases["case_003"]) == {deleted_kind.value}
    for cid in ("case_004", "case_005"):
        assert cases[cid]["status"] == "valid"
    # Each message names the case and the file, and says how to fix it.
    for cid, key in [("case_000", "truncated"), ("case_001", "nan"), ("case_002", "label")]:
        msg = cases[cid]["problems"][0]["message"]
        assert cid in msg and Path(paths[key]).name in msg and ";" in msg
        assert cases[cid]["problems"][0]["file"].endswith(Path(paths[key]).name)
    assert "5.00 mm" in cases["case_002"]["problems"][0]["message"]
    # The fingerprint is still written, from the two valid cases only.
    fp = load_fingerprint(site / "fingerprint.json")
    assert (fp["num_cases"], fp["num_valid"]) == (6, 2)
    assert len(fp["shapes"]) == len(fp["spacings"]) == 2


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
        lambda s: _truncate(s / "case_001/FLAIR.nii.gz"),
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
        lambda s: _rewrite(s / "imagesTr/case_001.nii.gz", lambda a: a[..., :2]),
        "case_001",
        {ProblemKind.CHANNEL_MISMATCH},
        [],
    ),
    (
        "shape-mismatch",
        "folder",
        lambda s: _rewrite(s / "case_001/T2.nii.gz", lambda a: a[:-2]),
        "case_001",
        {ProblemKind.SHAPE_MISMATCH},
        [],
    ),
    (
        "modality-affine",
        "folder",
        lambda s: _rewrite(s / "case_001/T2.nii.gz", lambda a: a, _shift_5mm),
        "case_001",
        {ProblemKind.AFFINE_MISMATCH},
        [],
    ),
    (
        "rotated-label",
        "folder",
        # Same origin, 90 degree rotation: corners move far apart in world space.
        lambda s: _rewrite(
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
        lambda s: _rewrite(
            s / "case_001/FLAIR.nii.gz", lambda a: np.where(a > 250, np.inf, a).astype(np.float32)
        ),
        "case_001",
        {ProblemKind.NON_FINITE},
        [],
    ),
    (
        "constant",
        "folder",
        lambda s: _rewrite(s / "case_001/T1.nii.gz", lambda a: np.zeros_like(a)),
        "case_001",
        {ProblemKind.CONSTANT_IMAGE},
        [],
    ),
    (
        "fractional-label",
        "folder",
        lambda s: _rewrite(s / "case_001/label.nii.gz", lambda a: a.astype(np.float32) * 0.5),
        "case_001",
        {ProblemKind.LABEL_NON_INTEGER},
        [],
    ),
    (
        "undeclared-label",
        "folder",
        lambda s: _rewrite(s / "case_001/label.nii.gz", lambda a: np.where(a == 2, 7, a)),
        "case_001",
        {ProblemKind.LABEL_UNDECLARED},
        [],
    ),
    (
        "too-large",
        "folder",
        lambda s: [
            _rewrite(s / f"case_001/{n}.nii.gz", lambda a: np.pad(a, ((0, 12),) * 3))
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
    site = _copy(valid_sites[fmt], tmp_path / "site")
    corrupt(site)
    rc, report = _run_check(site, tmp_path, *extra)
    assert rc == 1
    cases = _cases(report)
    assert _error_kinds(cases[bad_case]) == {k.value for k in kinds}
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
    site = _copy(valid_sites["folder"], tmp_path / "site")

    def shift(aff: np.ndarray) -> np.ndarray:
        aff[:3, 3] += [0.3, 0.4, 0.0]  # 0.5 mm
        return aff

    _rewrite(site / "case_002/label.nii.gz", lambda a: a, shift)
    rc, _ = _run_check(site, tmp_path)
    assert rc == 0
    rc, report = _run_check(site, tmp_path, "--affine-tolerance-mm", "0.25")
    assert rc == 1
    assert _error_kinds(_cases(report)["case_002"]) == {ProblemKind.AFFINE_MISMATCH.value}


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
    rc, report = _run_check(site, tmp_path)
    assert rc == 1
    # The table shows each problem's kind (not swallowed as rich markup) and the verdict.
    out = capsys.readouterr()
    assert "[missing_modality]" in out.out and "[missing_file]" in out.out
    assert "2 of 3 case(s) invalid" in out.err
    cases = _cases(report)
    assert _error_kinds(cases["FED_000"]) == set()
    assert _error_kinds(cases["FED_001"]) == {ProblemKind.MISSING_MODALITY.value}
    assert "FLAIR" in cases["FED_001"]["problems"][0]["message"]
    assert _error_kinds(cases["FED_002"]) == {ProblemKind.MISSING_FILE.value}


def test_manifest_entry_without_image_is_reported(
    valid_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = _copy(valid_sites["msd-split"], tmp_path / "site")
    _edit_manifest(site, lambda m: m["training"].append({"label": "labelsTr/case_000.nii.gz"}))
    rc, report = _run_check(site, tmp_path)
    assert rc == 1
    cases = _cases(report)
    assert _error_kinds(cases["#6"]) == {ProblemKind.MANIFEST.value}
    assert sum(c["valid"] for c in cases.values()) == 6


def test_config_sets_modalities_labels_and_thresholds(
    valid_sites: dict[str, Path],
    write_federation_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    site = _copy(valid_sites["folder"], tmp_path / "hospital-a")
    # The federation expects a 4th modality the site never had: a warning, not an error.
    cfg = write_federation_config(
        tmp_path / "fed.yaml", {"hospital-a": site}, modalities=["t1", "T2", "FLAIR", "PD"]
    )
    rc, report = _run_check(site, tmp_path, "--config", str(cfg))
    assert rc == 0
    assert report["site"] == "hospital-a"
    assert report["modalities"] == ["t1", "T2", "FLAIR", "PD"]
    for case in report["cases"]:
        assert case["status"] == "warning"
        assert [p["kind"] for p in case["problems"]] == [ProblemKind.ABSENT_MODALITY.value]
    fp = load_fingerprint(site / "fingerprint.json")
    assert fp["missing_modalities"] == {"t1": 0, "T2": 0, "FLAIR": 0, "PD": 6}
    assert set(fp["intensity_percentiles"]) == {"t1", "T2", "FLAIR"}

    rc, _ = _run_check(site, tmp_path, "--config", str(cfg), "--require-all-modalities")
    assert rc == 1

    # Labels come from the config: a federation without "lesion" makes value 2 undeclared.
    cfg2 = write_federation_config(
        tmp_path / "fed2.yaml",
        {"hospital-a": site},
        labels={0: "background", 1: "tissue"},
        preprocessing={"affine_tolerance_mm": 0.5, "max_case_megavoxels": 1.0},
    )
    rc, report = _run_check(site, tmp_path, "--config", str(cfg2))
    assert rc == 1
    assert all(_error_kinds(c) == {ProblemKind.LABEL_UNDECLARED.value} for c in report["cases"])


def test_unknown_layout_and_bad_config_exit_1(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", str(empty)]) == 1
    assert main(["data", "check", str(tmp_path / "nope")]) == 1
    assert main(["data", "check", str(empty), "--config", str(tmp_path / "missing.yaml")]) == 1


def test_fingerprint_goes_where_asked(valid_sites: dict[str, Path], tmp_path: Path) -> None:
    site = _copy(valid_sites["msd"], tmp_path / "site")
    fp_path = tmp_path / "share" / "hospital-c.json"
    assert main(["data", "check", str(site), "--fingerprint", str(fp_path)]) == 0
    assert fp_path.is_file() and not (site / "fingerprint.json").exists()


# -- fingerprint ----------------------------------------------------------------------------


def _numbers(obj: Any) -> int:
    if isinstance(obj, list):
        return sum(_numbers(v) for v in obj)
    if isinstance(obj, dict):
        return sum(_numbers(v) for v in obj.values())
    return 1 if isinstance(obj, int | float) and not isinstance(obj, bool) else 0


def _lists(obj: Any, key: str = "") -> list[tuple[str, list[Any]]]:
    out = []
    if isinstance(obj, list):
        out.append((key, obj))
        for v in obj:
            out += _lists(v, key)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += _lists(v, k)
    return out


def test_fingerprint_holds_aggregates_only(make_site: Callable[..., Path], tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", "folder", n_cases=5, shape=(20, 16, 18))
    assert main(["data", "check", str(site)]) == 0
    fp = json.loads((site / "fingerprint.json").read_text())
    assert set(fp) == set(FINGERPRINT_KEYS)
    n = fp["num_cases"]
    for key, lst in _lists(fp):
        if key in ("shapes", "spacings") and lst and isinstance(lst[0], list):
            assert len(lst) <= n  # one [x, y, z] per case, nothing per voxel
        else:
            assert _numbers(lst) <= 256, key
    # Per-case entries exist only for shapes and spacings; everything else is aggregated.
    assert fp["shapes"] == [[20 + i % 3, 16 + i % 3, 18 + i % 3] for i in range(5)]
    assert fp["spacings"] == [[1.0, 1.2, 1.5]] * 5
    assert fp["median_spacing"] == [1.0, 1.2, 1.5]
    assert fp["orientations"] == {"RAS": 5}
    assert fp["missing_modalities"] == {"T1": 0, "T2": 0, "FLAIR": 0}
    assert sum(fp["label_fractions"].values()) == pytest.approx(1.0, abs=1e-4)
    assert set(fp["label_fractions"]) == {"background", "tissue", "lesion"}
    assert 0 < fp["label_fractions"]["lesion"] < fp["label_fractions"]["tissue"]
    for m in MODALITIES:
        st = fp["intensity_percentiles"][m]
        assert st["p00.5"] <= st["p50"] <= st["p99.5"]
        assert st["std"] > 0
    # Conftest gives T1 < T2 < FLAIR in the foreground (100 / 140 / 180 + lesion).
    medians = [fp["intensity_percentiles"][m]["p50"] for m in MODALITIES]
    assert medians == sorted(medians) and 90 < medians[0] < 110


def test_fingerprint_orientation_and_spacing_from_the_files(
    make_site: Callable[..., Path],
    write_nifti: Callable[..., Path],
    make_affine: Callable[..., np.ndarray],
    tiny_volume: Callable[..., tuple[np.ndarray, np.ndarray]],
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path / "site", "folder", n_cases=3)
    # Rewrite case_002 as an LPS, 0.8 x 0.8 x 3 mm scan.
    aff = make_affine((0.8, 0.8, 3.0), "LPS")
    image, label = tiny_volume((16, 16, 16), seed=9)
    for c, m in enumerate(MODALITIES):
        write_nifti(site / f"case_002/{m}.nii.gz", image[c], aff)
    write_nifti(site / "case_002/label.nii.gz", label, aff)
    manifest = load_site(site)
    report = check_site(manifest)
    assert report.valid
    fp = fingerprint(manifest, report)
    assert fp["orientations"] == {"RAS": 2, "LPS": 1}
    assert fp["spacings"][2] == [0.8, 0.8, 3.0]
    assert fp["median_spacing"] == [1.0, 1.2, 1.5]


def test_each_file_is_read_once_per_case(
    valid_sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = check_mod.read_image

    def counting(path: Any) -> Any:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(check_mod, "read_image", counting)
    manifest = load_site(valid_sites["msd"])  # one 4D file backs the three modalities
    case = manifest.cases[0]
    report = check_case(case, manifest.labels, CheckSettings(), declared_modalities=MODALITIES)
    assert report.valid and report.stats is not None
    assert set(report.stats.intensity) == set(MODALITIES)
    assert sorted(reads) == sorted(case.files()) and len(reads) == 2


def test_site_report_api(valid_sites: dict[str, Path], tmp_path: Path) -> None:
    site = _copy(valid_sites["folder"], tmp_path / "site")
    (site / "case_004/T1.nii.gz").unlink()
    report = check_site(load_site(site))
    assert not report.valid
    assert report.num_valid == 5
    bad = report.case("case_004")
    assert bad.kinds == {ProblemKind.MISSING_MODALITY} and bad.stats is None
    assert json.loads(report.to_json())["cases"][4]["problems"][0]["kind"] == "missing_modality"
    with pytest.raises(DatasetFormatError, match="no case"):
        report.case("nope")
    with pytest.raises(PreprocessingError, match="affine_tolerance_mm"):
        CheckSettings(affine_tolerance_mm=0.0)


# -- coordinator side -----------------------------------------------------------------------


def test_plan_target_spacing_is_the_median_of_site_medians() -> None:
    fps = [
        {"site": "a", "median_spacing": [1.0, 1.0, 3.0]},
        {"site": "b", "median_spacing": [0.8, 0.9, 1.5]},
        {"site": "c", "median_spacing": [1.234, 1.111, 5.0]},
        {"site": "d", "median_spacing": None},  # no valid case: skipped
    ]
    assert plan_target_spacing(fps) == (1.0, 1.0, 3.0)
    assert plan_target_spacing(fps[1:3]) == (1.02, 1.01, 3.25)
    with pytest.raises(PreprocessingError, match="target_spacing"):
        plan_target_spacing([fps[3]])
    with pytest.raises(DatasetFormatError, match="median_spacing"):
        plan_target_spacing([{"site": "x", "median_spacing": [1.0, -1.0]}])


def test_load_fingerprint_errors(valid_sites: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="not found"):
        load_fingerprint(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not a readable"):
        load_fingerprint(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"site": "a"}))
    with pytest.raises(DatasetFormatError, match="lacks keys"):
        load_fingerprint(tmp_path / "partial.json")
    site = _copy(valid_sites["msd"], tmp_path / "site")
    assert main(["data", "check", str(site)]) == 0
    fp = load_fingerprint(site / "fingerprint.json")
    assert plan_target_spacing([fp]) == (1.0, 1.2, 1.5)
