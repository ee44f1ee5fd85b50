"""fedmed predict: masks come back in the input's exact geometry, aligned in world space."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.data.io import read_image, write_image
from fedmed.training.checkpoint import load_model
from tests.support.runs import grid, scan, train_toy_run


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_toy_run(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize(
    ("axcodes", "spacing", "shape", "rotate"),
    [
        ("LPS", (1.5, 1.5, 1.5), (36, 30, 32), 0.0),
        ("RAS", (1.3, 1.6, 1.4), (34, 30, 32), 17.0),  # oblique
        ("LIA", (1.0, 1.0, 3.0), (48, 44, 14), 0.0),  # anisotropic, permuted axes
    ],
    ids=["lps", "oblique", "anisotropic"],
)
def test_predict_writes_mask_in_input_geometry(
    model_path: Path, tmp_path: Path, axcodes: str, spacing: tuple, shape: tuple, rotate: float
) -> None:
    aff = grid(axcodes, spacing, shape, rotate)
    images, label = scan(aff, shape, seed=42)
    t1 = write_image(tmp_path / "T1.nii.gz", images["T1"].array, aff)
    fl = write_image(tmp_path / "flair.nii.gz", images["FLAIR"].array, aff)
    out = tmp_path / "mask.nii.gz"
    rc = main(
        [
            "predict",
            "--model",
            str(model_path),
            "--image",
            str(t1),
            "--image",
            str(fl),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    mask = read_image(out)
    assert mask.spatial_shape == shape
    np.testing.assert_allclose(mask.affine, aff, atol=1e-4)
    src = nib.load(str(t1))
    got = nib.load(str(out))
    assert int(got.header["qform_code"]) == int(src.header["qform_code"])
    assert int(got.header["sform_code"]) == int(src.header["sform_code"])
    pred, truth = mask.array[0] > 0, label.array[0] > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice >= 0.85, f"world-space misalignment: Dice {dice:.3f}"


def test_predict_with_a_missing_modality_and_modality_syntax(
    model_path: Path, tmp_path: Path
) -> None:
    aff = grid("RAS", (2.0, 2.0, 2.0), (24, 24, 24))
    images, _ = scan(aff, (24, 24, 24), seed=7)
    t1 = write_image(tmp_path / "scan.nii.gz", images["T1"].array, aff)
    out = tmp_path / "mask.nii.gz"
    assert (
        main(["predict", "--model", str(model_path), "--image", f"T1={t1}", "--out", str(out)]) == 0
    )
    assert read_image(out).spatial_shape == (24, 24, 24)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "XX=a.nii.gz"], "unknown modality"),
        (["--image", "scan.nii.gz", "--image", "other.nii.gz"], "cannot tell the modality"),
    ],
)
def test_predict_bad_arguments_exit_1(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list, message: str
) -> None:
    rc = main(["predict", "--model", str(model_path), *args, "--out", str(tmp_path / "m.nii.gz")])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        [
            "predict",
            "--model",
            str(tmp_path / "none.pt"),
            "--image",
            "T1=x.nii.gz",
            "--out",
            str(tmp_path / "m.nii.gz"),
        ]
    )
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_checkpoint_round_trip(model_path: Path) -> None:
    loaded = load_model(model_path)
    assert loaded.target_spacing == (2.0, 2.0, 2.0)
    assert loaded.cfg.modalities == ("T1", "FLAIR")
