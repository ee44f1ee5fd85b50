"""The baselines plan the target spacing from the sites' fingerprints when the config has none."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.data.fingerprint import FINGERPRINT_NAME, load_fingerprint
from fedmed.data.planning import plan_target_spacing
from tests.support.federations import SITES, make_federation
from tests.support.policies import write_policy

SITE_SPACING = {"a": 2.0, "b": 2.5, "c": 3.0}
"""Each site's (isotropic) voxel size: the planned spacing is the median, 2.5 mm."""


def _respace(site_dir: Path, spacing: float) -> None:
    """Rewrite every NIfTI of a site with another voxel size (same voxels)."""
    for path in site_dir.rglob("*.nii.gz"):
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([spacing] * 3 + [1.0])), path)


@pytest.mark.slow
def test_centralized_with_null_spacing_plans_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_federation(tmp_path, preprocessing={"target_spacing": None})
    for site in SITES:
        _respace(tmp_path / f"site-{site}", SITE_SPACING[site])
    out = tmp_path / "run"
    args = ["centralized", "--config", str(cfg), "--out", str(out), "--epochs", "1"]
    # Without fingerprints there is nothing to plan from: a readable error, no run folder.
    assert main(args) == 1
    assert "fedmed data check" in capsys.readouterr().err and not out.exists()

    policy = write_policy(tmp_path / "policy.yaml")  # k = 1: each site has only 4 cases
    for site in SITES:
        assert main(["data", "check", str(tmp_path / f"site-{site}"), "--policy",
                     str(policy)]) == 0
    fps = [load_fingerprint(tmp_path / f"site-{s}" / FINGERPRINT_NAME) for s in SITES]
    planned = plan_target_spacing(fps)
    assert planned == (2.5, 2.5, 2.5)  # the median of the sites' median spacings
    capsys.readouterr()

    assert main(args) == 0
    console = capsys.readouterr().out
    assert "target spacing planned from the sites' fingerprints: 2.5 x 2.5 x 2.5 mm" in console
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "centralized"
    assert summary["target_spacing"] == list(planned)

    local = tmp_path / "local-b"
    assert main(["local", "--config", str(cfg), "--site", "b", "--out", str(local),
                 "--epochs", "1"]) == 0
    assert json.loads((local / "summary.json").read_text())["target_spacing"] == list(planned)
