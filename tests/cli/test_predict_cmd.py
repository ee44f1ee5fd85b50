"""fedmed predict: the command's options (site folders, output formats, bad input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.data.io import read_image, write_image
from tests.support.runs import grid, scan, train_toy_run


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_toy_run(tmp_path_factory.mktemp("run"), labels={1: "lesion"})


@pytest.fixture(scope="module")
def t1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    aff = grid("LPS", (1.5, 1.5, 1.5), (30, 28, 26))
    images, _ = scan(aff, (30, 28, 26), seed=1)
    return write_image(tmp_path_factory.mktemp("scan") / "T1.nii.gz", images["T1"].array, aff)


def test_site_dir_writes_one_mask_per_case(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    site = tmp_path / "site"
    shapes = {"p1": (30, 28, 26), "p2": (26, 30, 28)}
    for i, (case, shape) in enumerate(shapes.items()):
        aff = grid("RAS", (1.5, 1.4, 1.6), shape, 10.0 * i)
        images, label = scan(aff, shape, seed=i)
        for m, img in images.items():
            write_image(site / case / f"{m}.nii.gz", img.array, aff)
        write_image(site / case / "label.nii.gz", label.array, aff)
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(model), "--site-dir", str(site), "--out", str(out)]) == 0
    for case, shape in shapes.items():
        mask = read_image(out / f"{case}.nii.gz")
        truth = read_image(site / case / "label.nii.gz")
        assert mask.spatial_shape == shape
        np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-5)
    assert "Dice" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "dicom-seg"], "--dicom-reference SERIES_DIR"),
        (["--dicom-reference", "somewhere"], "apply to --format dicom-seg only"),
        (["--format", "dicom-seg", "--codes", "no-such-codes.yaml"], "no-such-codes.yaml"),
        (["--format", "dicom-seg", "--dicom-reference", "no-such-series"], "not a folder"),
    ],
    ids=["nifti-input-without-series", "reference-without-seg", "missing-codes", "bad-reference"],
)
def test_bad_dicom_seg_options_exit_1_before_inference(
    model: Path,
    t1: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "seg.dcm"
    argv = ["predict", "--model", str(model), "--image", f"T1={t1}", "--out", str(out), *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert message in err
    assert "predicting without" not in caplog.text  # refused before any inference (no FLAIR)
    assert not out.exists()


def test_unknown_format_is_a_usage_error(model: Path, t1: Path, tmp_path: Path) -> None:
    argv = ["predict", "--model", str(model), "--image", f"T1={t1}", "--out", str(tmp_path / "m")]
    assert main([*argv, "--format", "png"]) == 2
