"""fedmed export bundle: a MONAI Bundle that MONAI's own tools validate and run.

The acceptance check: MONAI's bundle runner (``python -m monai.bundle run``, a real process)
segments a NIfTI case into a mask with the input's exact shape and affine, and the mask
agrees with ``fedmed predict``'s (Dice >= 0.99).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.data.io import read_image, write_image
from fedmed.export.schema import write_schema
from tests.support.runs import grid, scan, train_toy_run

FEDERATED_SUMMARY = {
    "mode": "federated",
    "strategy": "fedprox",
    "rounds": 3,
    "dice_mean": 0.91,
    "dice_per_class": {"lesion": 0.91},
    "hd95_mean": 2.5,
    "per_site": {},
    "wall_seconds": 10.0,
    "sites": ["hospital-a", "hospital-b"],
    "epsilon": {"hospital-a": 4.2, "hospital-b": 5.1},
}
COMPARISON = {
    "epochs": 6,
    "rounds": 3,
    "centralized": {"dice_mean": 0.95},
    "local": {"hospital-a": {"dice_mean": 0.80}, "hospital-b": {"dice_mean": 0.70}},
    "local_mean_dice": 0.75,
    "federated": {"fedavg": {"dice_mean": 0.90}, "fedprox": {"dice_mean": 0.91}},
    "ratio_federated_to_centralized": {"fedavg": 0.947, "fedprox": 0.958},
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A federated U-Net run inside a comparison folder, and a fusion-network run."""
    root = tmp_path_factory.mktemp("runs")
    (root / "cmp").mkdir()
    (root / "cmp" / "comparison.json").write_text(json.dumps(COMPARISON))
    unet = root / "cmp" / "federated-fedprox"
    train_toy_run(unet, FEDERATED_SUMMARY, labels={1: "lesion"})
    fusion = root / "fusion"
    train_toy_run(fusion, {"mode": "centralized", "sites": ["a"]}, model={"architecture": "fusion"})
    return {"unet": unet, "fusion": fusion}


@pytest.fixture(scope="module")
def bundles(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    for name, run in runs.items():
        assert main(["export", "bundle", str(run), str(out / name)]) == 0
    return {name: out / name for name in runs}


def write_case(folder: Path, axcodes: str, spacing: tuple, shape: tuple, rotate: float) -> dict:
    aff = grid(axcodes, spacing, shape, rotate)
    images, _ = scan(aff, shape, seed=42)
    return {
        m: str(write_image(folder / f"{m}.nii.gz", images[m].array, aff)) for m in ("T1", "FLAIR")
    }


def fedmed_predict(run: Path, files: dict, out: Path) -> np.ndarray:
    images = [f"{m}={p}" for m, p in files.items()]
    argv = ["predict", "--model", str(run / "model.pt"), "--out", str(out)]
    assert main(argv + [a for i in images for a in ("--image", i)]) == 0
    return read_image(out).array[0]


def test_bundle_layout_and_metadata(bundles: dict[str, Path], tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    b = bundles["unet"]
    for f in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "docs/README.md",
    ):
        assert (b / f).is_file(), f
    meta = json.loads((b / "configs/metadata.json").read_text())
    # MONAI's own validator against a local copy of its schema (nothing downloads).
    schema = write_schema(tmp_path / "schema.json")
    verify_metadata(meta_file=str(b / "configs/metadata.json"), filepath=str(schema))
    fed = meta["fedmed"]["federation"]
    assert fed["sites"] == ["hospital-a", "hospital-b"]
    assert (fed["strategy"], fed["rounds"]) == ("fedprox", 3)
    assert fed["differential_privacy"]["epsilon"] == {"hospital-a": 4.2, "hospital-b": 5.1}
    cmp = meta["fedmed"]["comparison"]
    assert cmp["centralized_dice"] == 0.95 and cmp["this_run"] == "federated-fedprox"
    assert cmp["federated_dice"] == {"fedavg": 0.90, "fedprox": 0.91}
    assert meta["fedmed"]["labels"] == {"0": "background", "1": "lesion"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "lesion"
    assert meta["eval_metrics"]["mean_dice"] == 0.91
    readme = (b / "docs/README.md").read_text()
    assert "fedmed must be installed" in readme and "python -m monai.bundle run" in readme


@pytest.mark.parametrize("arch", ["unet", "fusion"])
def test_verify_net_in_out(bundles: dict[str, Path], arch: str) -> None:
    from monai.bundle import verify_net_in_out

    b = bundles[arch]
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(b / "configs/metadata.json"),
        config_file=str(b / "configs/inference.json"),
        device="cpu",
        n=4,
    )


@pytest.mark.slow
@pytest.mark.integration
def test_monai_bundle_runner_matches_fedmed_predict(
    bundles: dict[str, Path], runs: dict[str, Path], tmp_path: Path
) -> None:
    """MONAI's CLI runner, in its own process, on an LPS NIfTI case."""
    files = write_case(tmp_path / "case", "LPS", (1.5, 1.5, 1.5), (36, 30, 32), 0.0)
    b = bundles["unet"]
    datalist = repr([{**files, "case_id": "case1"}])
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str(b / "configs/inference.json"),
           "--meta_file", str(b / "configs/metadata.json"),
           "--bundle_root", str(b), "--datalist", datalist,
           "--output_dir", str(tmp_path / "masks")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask_path = tmp_path / "masks" / "case1.nii.gz"
    mask: Any = nib.load(str(mask_path))
    src: Any = nib.load(files["T1"])
    assert mask.shape == src.shape
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-6)
    ours = fedmed_predict(runs["unet"], files, tmp_path / "predict.nii.gz")
    d = dice(np.asarray(mask.dataobj), ours)
    print(f"bundle vs fedmed predict Dice (LPS): {d:.4f}")
    assert d >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet", "fusion"])
def test_config_workflow_on_a_site_folder(
    bundles: dict[str, Path], runs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    """MONAI's ConfigWorkflow over a site folder (fedmed's layout); the case lacks FLAIR."""
    from monai.bundle import ConfigWorkflow

    site = tmp_path / "site"
    files = write_case(site / "case7", "RAS", (1.3, 1.6, 1.4), (34, 30, 32), 17.0)  # oblique
    Path(files.pop("FLAIR")).unlink()
    b = bundles[arch]
    workflow = ConfigWorkflow(
        config_file=str(b / "configs/inference.json"),
        meta_file=str(b / "configs/metadata.json"),
        workflow_type="inference",
        bundle_root=str(b),
        dataset_dir=str(site),
        output_dir=str(tmp_path / "masks"),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    mask = read_image(tmp_path / "masks" / "case7.nii.gz")
    src = read_image(files["T1"])
    assert mask.spatial_shape == src.spatial_shape
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-6)
    ours = fedmed_predict(runs[arch], files, tmp_path / "predict.nii.gz")
    d = dice(mask.array[0], ours)
    print(f"bundle vs fedmed predict Dice ({arch}, oblique, FLAIR missing): {d:.4f}")
    assert d >= 0.99


def test_missing_run_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-run"
    assert main(["export", "bundle", str(missing), str(tmp_path / "bundle")]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err.replace("\n", "") and "does not exist" in err
    assert not (tmp_path / "bundle").exists()


def test_existing_bundle_needs_force(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "bundle", str(runs["unet"]), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["export", "bundle", str(runs["unet"]), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists()
