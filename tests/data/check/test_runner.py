"""`fedmed data check` as a whole: the per-case and per-site runners and the command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fedmed.data.check.rules as rules
from fedmed.cli.main import main
from fedmed.data.check import CheckSettings, ProblemKind, check_case, check_site
from fedmed.data.fingerprint import load_fingerprint
from fedmed.data.formats import load_site
from fedmed.errors import DatasetFormatError, PreprocessingError
from tests.support.corruptions import (
    MODALITIES,
    cases_by_id,
    copy_site,
    error_kinds,
    rewrite,
    run_check,
    shift_5mm,
    truncate,
    with_nan,
)
from tests.support.policies import write_policy

# -- acceptance -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["folder", "msd", "msd-split"])
def test_valid_site_exits_0_and_writes_fingerprint(
    fmt: str, valid_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = copy_site(valid_sites[fmt], tmp_path / "site")
    rc, report = run_check(site, tmp_path)
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
    site = copy_site(valid_sites[fmt], tmp_path / "site")
    truncate(site / paths["truncated"])
    rewrite(site / paths["nan"], with_nan)
    rewrite(site / paths["label"], lambda a: a, shift_5mm)
    (site / paths["deleted"]).unlink()

    rc, report = run_check(site, tmp_path)

    assert rc == 1
    assert report["valid"] is False
    cases = cases_by_id(report)
    invalid = {cid for cid, c in cases.items() if not c["valid"]}
    assert invalid == {"case_000", "case_001", "case_002", "case_003"}
    assert error_kinds(cases["case_000"]) == {ProblemKind.CORRUPT.value}
    assert error_kinds(cases["case_001"]) == {ProblemKind.NON_FINITE.value}
    assert error_kinds(cases["case_002"]) == {ProblemKind.AFFINE_MISMATCH.value}
    assert error_kinds(cases["case_003"]) == {deleted_kind.value}
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
    assert fp["median_spacing"] is None and "fewer than 10" in fp["withheld"]


def test_config_sets_modalities_labels_and_thresholds(
    valid_sites: dict[str, Path],
    write_federation_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    site = copy_site(valid_sites["folder"], tmp_path / "hospital-a")
    # The federation expects a 4th modality the site never had: a warning, not an error.
    cfg = write_federation_config(
        tmp_path / "fed.yaml", {"hospital-a": site}, modalities=["t1", "T2", "FLAIR", "PD"]
    )
    policy = write_policy(tmp_path / "policy.yaml")  # k = 1: the site has 6 cases
    rc, report = run_check(site, tmp_path, "--config", str(cfg), "--policy", str(policy))
    assert rc == 0
    assert report["site"] == "hospital-a"
    assert report["modalities"] == ["t1", "T2", "FLAIR", "PD"]
    for case in report["cases"]:
        assert case["status"] == "warning"
        assert [p["kind"] for p in case["problems"]] == [ProblemKind.ABSENT_MODALITY.value]
    fp = load_fingerprint(site / "fingerprint.json")
    assert fp["missing_modalities"] == {"t1": 0, "T2": 0, "FLAIR": 0, "PD": 6}
    assert set(fp["intensity_percentiles"]) == {"t1", "T2", "FLAIR"}

    rc, _ = run_check(site, tmp_path, "--config", str(cfg), "--require-all-modalities")
    assert rc == 1

    # Labels come from the config: a federation without "lesion" makes value 2 undeclared.
    cfg2 = write_federation_config(
        tmp_path / "fed2.yaml",
        {"hospital-a": site},
        labels={0: "background", 1: "tissue"},
        preprocessing={"affine_tolerance_mm": 0.5, "max_case_megavoxels": 1.0},
    )
    rc, report = run_check(site, tmp_path, "--config", str(cfg2))
    assert rc == 1
    assert all(error_kinds(c) == {ProblemKind.LABEL_UNDECLARED.value} for c in report["cases"])


def test_unknown_layout_and_bad_config_exit_1(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", str(empty)]) == 1
    assert main(["data", "check", str(tmp_path / "nope")]) == 1
    assert main(["data", "check", str(empty), "--config", str(tmp_path / "missing.yaml")]) == 1


def test_each_file_is_read_once_per_case(
    valid_sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = rules.read_image

    def counting(path: Any, **kwargs: Any) -> Any:
        reads.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(rules, "read_image", counting)
    manifest = load_site(valid_sites["msd"])  # one 4D file backs the three modalities
    case = manifest.cases[0]
    report = check_case(case, manifest.labels, CheckSettings(), declared_modalities=MODALITIES)
    assert report.valid and report.stats is not None
    assert set(report.stats.intensity) == set(MODALITIES)
    assert sorted(reads) == sorted(case.files()) and len(reads) == 2


def test_site_report_api(valid_sites: dict[str, Path], tmp_path: Path) -> None:
    site = copy_site(valid_sites["folder"], tmp_path / "site")
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
