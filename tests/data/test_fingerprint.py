"""The site fingerprint: aggregates only, one file name, one writer, one loader."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.config import load_config
from fedmed.data.check import check_site
from fedmed.data.fingerprint import (
    FINGERPRINT_KEYS,
    FINGERPRINT_NAME,
    build_fingerprint,
    load_fingerprint,
    load_site_fingerprints,
    write_fingerprint,
)
from fedmed.data.formats import load_site
from fedmed.data.planning import plan_target_spacing
from fedmed.errors import ConfigError, DatasetFormatError, PreprocessingError
from tests.support.corruptions import MODALITIES, copy_site
from tests.support.policies import write_policy


def test_fingerprint_goes_where_asked(valid_sites: dict[str, Path], tmp_path: Path) -> None:
    site = copy_site(valid_sites["msd"], tmp_path / "site")
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
    policy = write_policy(tmp_path / "policy.yaml", reporting={"min_cases_per_metric": 5})
    assert main(["data", "check", str(site), "--policy", str(policy)]) == 0
    fp = json.loads((site / "fingerprint.json").read_text())
    assert set(fp) == set(FINGERPRINT_KEYS)
    # Nothing per case: no list longer than three numbers, no case id anywhere.
    for key, lst in _lists(fp):
        assert _numbers(lst) <= 3, key
    assert "case_" not in json.dumps(fp)
    assert fp["min_cases"] == 5 and "withheld" not in fp
    assert fp["median_shape"] == [21, 17, 19]  # of 20/21/22 x 16/17/18 x 18/19/20
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
    fp = build_fingerprint(manifest, report)
    assert fp["orientations"] == {"RAS": 2, "LPS": 1}
    assert fp["median_spacing"] == [1.0, 1.2, 1.5]


def test_fingerprint_withholds_statistics_below_k(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "site", "folder", n_cases=3)
    # The strict default policy (k = 10) lets three cases share counts only.
    assert main(["data", "check", str(site)]) == 0
    fp = json.loads((site / "fingerprint.json").read_text())
    assert set(FINGERPRINT_KEYS) <= set(fp) and fp["min_cases"] == 10
    assert (fp["num_cases"], fp["num_valid"]) == (3, 3)
    assert fp["median_spacing"] is None and fp["median_shape"] is None
    assert fp["intensity_percentiles"] == {} and fp["label_fractions"] == {}
    assert fp["orientations"] == {} and "fewer than 10" in fp["withheld"]
    # The planner skips a site without statistics rather than guessing.
    with pytest.raises(PreprocessingError, match="no site fingerprint"):
        plan_target_spacing([fp])


def test_load_fingerprint_errors(valid_sites: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="not found"):
        load_fingerprint(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not a readable"):
        load_fingerprint(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"site": "a"}))
    with pytest.raises(DatasetFormatError, match="lacks keys"):
        load_fingerprint(tmp_path / "partial.json")
    site = copy_site(valid_sites["msd"], tmp_path / "site")
    policy = write_policy(tmp_path / "policy.yaml")
    assert main(["data", "check", str(site), "--policy", str(policy)]) == 0
    fp = load_fingerprint(site / "fingerprint.json")
    assert plan_target_spacing([fp]) == (1.0, 1.2, 1.5)


def test_write_then_load_site_fingerprints(
    valid_sites: dict[str, Path], write_federation_config: Callable[..., Path], tmp_path: Path
) -> None:
    a = copy_site(valid_sites["folder"], tmp_path / "hospital-a")
    b = copy_site(valid_sites["msd"], tmp_path / "hospital-c")
    cfg_path = write_federation_config(tmp_path / "fed.yaml", {"hospital-a": a, "hospital-c": b})
    cfg = load_config(cfg_path)
    with pytest.raises(ConfigError, match="hospital-a") as err:
        load_site_fingerprints(cfg)
    assert "fedmed data check" in str(err.value) and "hospital-c" in str(err.value)
    for site in (a, b):
        manifest = load_site(site)
        written = write_fingerprint(
            build_fingerprint(manifest, check_site(manifest)), site / FINGERPRINT_NAME
        )
        assert written == site / FINGERPRINT_NAME
    fps = load_site_fingerprints(cfg)
    assert [fp["site"] for fp in fps] == ["hospital-a", "hospital-c"]
    assert [fp["num_cases"] for fp in fps] == [6, 3]
    # An incomplete fingerprint is refused by the same loader.
    (b / FINGERPRINT_NAME).write_text(json.dumps({"site": "hospital-c"}))
    with pytest.raises(DatasetFormatError, match="lacks keys"):
        load_site_fingerprints(cfg)


def test_unwritable_fingerprint_is_a_readable_error(
    valid_sites: dict[str, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    manifest = load_site(valid_sites["msd"])
    with pytest.raises(DatasetFormatError, match="--fingerprint"):
        write_fingerprint(build_fingerprint(manifest, check_site(manifest)), blocker / "fp.json")
