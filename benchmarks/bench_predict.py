"""``fedmed predict`` on a scan reoriented and resampled on disk (issue: models and trainer).

A central-test case of the default generated federation is rewritten on disk in another
orientation (LPS) and another voxel size (1.2 mm), its label with nearest
neighbour. A model trained centrally on the federation then segments it through the CLI.
Figures: whether the mask has exactly the input's shape and affine (count of mismatches,
target 0), and Dice against the resampled label (target >= 0.8).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import Figure

SPACING = (1.2, 1.2, 1.2)


def _resample_lps(path: Path, out: Path, nearest: bool) -> Path:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    img = sitk.DICOMOrient(img, "RAI")  # ITK's "RAI" is LPS+ in world terms
    size = [
        int(round(sz * sp / ns))
        for sz, sp, ns in zip(img.GetSize(), img.GetSpacing(), SPACING, strict=True)
    ]
    res = sitk.Resample(
        img,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        img.GetOrigin(),
        SPACING,
        img.GetDirection(),
        0,
        img.GetPixelID(),
    )
    sitk.WriteImage(res, str(out))
    return out


def run(quick: bool = False) -> list[Figure]:
    import numpy as np

    from benchmarks._fixtures import synth_federation
    from fedmed.cli.main import main
    from fedmed.config import load_config
    from fedmed.data.formats import load_site
    from fedmed.data.io import read_image
    from fedmed.data.synth import default_preprocessing_section, default_training_sections
    from fedmed.evaluation.baselines import run_pooled
    from fedmed.training.metrics import case_metrics

    fed = synth_federation(
        4, 4 if quick else 10, test_cases=2 if quick else 8, scale=2.0 if quick else 1.0
    )
    # the cached federation may predate the current demo recipe: apply it
    cfg = load_config(fed).with_changes(
        preprocessing=default_preprocessing_section(),
        training=default_training_sections()["training"],
    )
    if quick:
        cfg = cfg.with_changes(model={"channels": (8, 16, 32)}, training={"epochs": 2})
    cfg = cfg.with_changes(training={"progress": False})
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    run_pooled(cfg, work / "run", force=True)
    case = load_site(cfg.resolve(cfg.central_test), cfg.modalities).cases[0]
    args = []
    for m, mf in case.images.items():
        args += ["--image", f"{m}={_resample_lps(mf.path, work / f'{m}.nii.gz', False)}"]
    label_path = _resample_lps(case.label, work / "label.nii.gz", True)  # type: ignore[arg-type]
    out = work / "mask.nii.gz"
    rc = main(["predict", "--model", str(work / "run" / "model.pt"), *args, "--out", str(out)])
    if rc != 0:
        raise RuntimeError(f"fedmed predict exited {rc}")
    mask, ref, truth = read_image(out), read_image(work / "T1.nii.gz"), read_image(label_path)
    mismatches = int(mask.spatial_shape != ref.spatial_shape) + int(
        not np.allclose(mask.affine, ref.affine, atol=1e-4)
    )
    m = case_metrics(mask.array[0].astype(int), truth.array[0].astype(int), cfg.num_classes)
    dice = float(np.nanmean(list(m.dice.values())))
    detail = (
        f"case {case.case_id} rewritten as LPS at {SPACING} mm, shape {ref.spatial_shape}; "
        + ", ".join(f"{cfg.labels[c]} {v:.3f}" for c, v in m.dice.items())
    )
    return [
        Figure(
            "predict",
            "geometry_mismatches",
            mismatches,
            "count",
            "0",
            mismatches == 0,
            "mask shape and affine vs the input's",
        ),
        Figure("predict", "dice_reoriented_resampled", dice, "Dice", ">= 0.8", dice >= 0.8, detail),
    ]
