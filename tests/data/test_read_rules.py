"""Safe loading: one reader, one set of rules, on every path that reads data.

:func:`fedmed.data.io.read_image` checks the header's claimed size and geometry before any
voxel is read, refuses non-finite voxels and singular or non-finite affines, and names the
file; the check, the preprocessing, the training cache and ``predict`` all go through it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fedmed.config import config_from_dict
from fedmed.data.cache import CaseCache
from fedmed.data.check import CheckSettings, ProblemKind, check_case
from fedmed.data.formats import load_site
from fedmed.data.io import Image, read_image
from fedmed.data.planning import PreprocessSettings, plan_preprocessing
from fedmed.data.preprocess import preprocess_case, preprocess_images
from fedmed.data.read_rules import DEFAULT_MAX_MEGAVOXELS, MAX_CHANNELS
from fedmed.errors import ConfigError, ImageReadError, PreprocessingError
from tests.support import bad_images as bad
from tests.support.dicom import write_dicom_series

NAN, INF = float("nan"), float("inf")

# (id, writer, the reader's refusal kind, words of the message)
BAD_NIFTI: list[tuple[str, Callable[[Path], Path], str, str]] = [
    ("nan", lambda p: bad.with_value(p, NAN), "non_finite", "NaN or infinite"),
    ("plus-inf", lambda p: bad.with_value(p, INF), "non_finite", "1 of 4096 voxels"),
    ("minus-inf", lambda p: bad.with_value(p, -INF), "non_finite", "voxel (3, 4, 5)"),
    ("huge-claim", bad.huge_header, "too_large", "64000.0 megavoxels"),
    ("empty-axis", lambda p: bad.huge_header(p, (0, 16, 16)), "corrupt", "empty volume"),
    (
        "many-channels",
        lambda p: bad.of_shape(p, (8, 8, 8, MAX_CHANNELS + 1)),
        "too_large",
        f"{MAX_CHANNELS + 1} channels",
    ),
    ("zero-affine", bad.zero_affine, "bad_affine", "voxel size along array axis 0 is 0 mm"),
    ("nan-affine", bad.nan_affine, "bad_affine", "NaN or infinite entries"),
    ("parallel-axes", bad.parallel_axes, "bad_affine", "parallel"),
    ("truncated", bad.truncated, "corrupt", "corrupt or truncated"),
    ("text", bad.text_file, "not_an_image", "not a NIfTI image"),
    ("2d", lambda p: bad.of_shape(p, (16, 16)), "not_3d", "got shape (16, 16)"),
    ("5d", lambda p: bad.of_shape(p, (8, 8, 8, 2, 2)), "not_3d", "expected a 3D image"),
    ("complex", lambda p: bad.of_shape(p, (8, 8, 8), np.complex64), "not_an_image", "complex"),
]


@pytest.mark.parametrize(
    ("writer", "kind", "words"), [r[1:] for r in BAD_NIFTI], ids=[r[0] for r in BAD_NIFTI]
)
def test_reader_refuses_bad_nifti_naming_the_file(
    writer: Callable[[Path], Path], kind: str, words: str, tmp_path: Path
) -> None:
    path = writer(tmp_path / "scan.nii.gz")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.kind == kind
    assert str(info.value).startswith(f"{path}: ")
    assert words in str(info.value)


def test_float64_beyond_float32_range_is_non_finite(tmp_path: Path) -> None:
    data = bad.volume().astype(np.float64)
    data[1, 2, 3] = 1e300  # finite on disk, infinite in the float32 array contract
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "big.nii.gz"))
    with pytest.raises(ImageReadError, match=r"voxel \(1, 2, 3\)") as info:
        read_image(tmp_path / "big.nii.gz")
    assert info.value.kind == "non_finite"


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_reader_refuses_non_finite_simpleitk_images(suffix: str, tmp_path: Path) -> None:
    data = bad.volume((6, 7, 8))
    data[2, 3, 4] = NAN
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    with pytest.raises(ImageReadError, match="NaN or infinite") as info:
        read_image(path)
    assert info.value.kind == "non_finite" and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "header"),
    [
        (
            "huge.mha",
            "ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_FLOAT\n"
            "ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n",
        ),
        (
            "huge.nrrd",
            "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
            "sizes: 4000 4000 4000\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
            "kinds: domain domain domain\nendian: little\nencoding: raw\n\n",
        ),
    ],
)
def test_simpleitk_header_claim_is_refused_before_reading(
    name: str, header: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_bytes(header.encode() + b"\0" * 4096)  # a few bytes of "voxels"
    with pytest.raises(ImageReadError, match="64000.0 megavoxels") as info:
        read_image(path)
    assert info.value.kind == "too_large"


def test_dicom_series_size_comes_from_one_header(tmp_path: Path) -> None:
    # 6 slices of 9 x 8: 432 voxels = 0.000432 megavoxels.
    write_dicom_series(
        tmp_path / "series", (bad.volume((9, 8, 6)) * 10).astype(np.int16), np.eye(4)
    )
    assert read_image(tmp_path / "series", max_megavoxels=0.0005).spatial_shape == (9, 8, 6)
    with pytest.raises(ImageReadError, match=r"0\.0 megavoxels per channel \(9 x 8 x 6\)") as info:
        read_image(tmp_path / "series", max_megavoxels=0.0004)
    assert info.value.kind == "too_large"


def test_limit_is_a_parameter_with_a_safe_default(tmp_path: Path) -> None:
    path = bad.of_shape(tmp_path / "v.nii.gz", (16, 16, 16))  # 4096 voxels
    assert DEFAULT_MAX_MEGAVOXELS == 64.0
    assert read_image(path, max_megavoxels=0.0041).spatial_shape == (16, 16, 16)
    with pytest.raises(ImageReadError, match="more than the limit of 0.004"):
        read_image(path, max_megavoxels=0.004)
    with pytest.raises(ConfigError, match="max_megavoxels must be a positive number"):
        read_image(path, max_megavoxels=0.0)


def test_valid_oblique_and_flipped_affines_pass(tmp_path: Path) -> None:
    aff = np.diag([-0.5, 2.0, -3.0, 1.0])
    t = np.deg2rad(30.0)
    aff[:3, :3] = (
        np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ aff[:3, :3]
    )
    nib.save(nib.Nifti1Image(bad.volume(), aff), str(tmp_path / "ok.nii.gz"))
    np.testing.assert_allclose(read_image(tmp_path / "ok.nii.gz").affine, aff, atol=1e-5)


_PEAK_RSS = """
import json, resource, sys
import nibabel, numpy
from fedmed.data.io import read_image
from fedmed.errors import ImageReadError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_image(sys.argv[1])
    kind = None
except ImageReadError as exc:
    kind = exc.kind
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kind": kind, "growth_mb": (after - before) / 1024.0}))
"""


def test_huge_claim_is_refused_without_allocating(tmp_path: Path) -> None:
    """A tiny file claiming 4000^3 float32 voxels (256 GB): peak RSS barely moves."""
    path = bad.huge_header(tmp_path / "huge.nii.gz")
    assert path.stat().st_size < 10_000
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kind"] == "too_large"
    # The limit is 64 megavoxels (256 MB of float32); the refusal costs almost nothing.
    assert result["growth_mb"] < 16.0, result


# -- every path applies the same rules -------------------------------------------------------

PATH_CASES = [
    ("nan", lambda p: bad.with_value(p, NAN), "non_finite", ProblemKind.NON_FINITE),
    ("huge-claim", bad.huge_header, "too_large", ProblemKind.TOO_LARGE),
    ("zero-affine", bad.zero_affine, "bad_affine", ProblemKind.BAD_AFFINE),
]


@pytest.mark.parametrize(
    ("writer", "kind", "problem"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES]
)
def test_check_preprocessing_and_cache_refuse_alike(
    writer: Callable[[Path], Path],
    kind: str,
    problem: ProblemKind,
    make_site: Callable[..., Path],
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path / "site", "folder", n_cases=1)
    target = writer(site / "case_000" / "T2.nii.gz")
    case = load_site(site).cases[0]
    report = check_case(case, {}, CheckSettings())
    assert [(p.kind, p.file) for p in report.errors] == [(problem, str(target))]
    settings = PreprocessSettings(("T1", "T2", "FLAIR"), (1.0, 1.0, 1.0), patch_size=(8, 8, 8))
    with pytest.raises(ImageReadError) as info:
        preprocess_case(case, settings)
    assert info.value.kind == kind and str(target) in str(info.value)
    cache = CaseCache(tmp_path / "cache", settings)
    with pytest.raises(ImageReadError, match=str(target)):
        cache.get(case)


def test_preprocessing_uses_the_configs_limit(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "site", "folder", n_cases=1, vary_shape=False)  # 16^3
    cfg = config_from_dict(
        {
            "modalities": ["T1", "T2", "FLAIR"],
            "labels": {0: "background", 1: "tissue", 2: "lesion"},
            "sites": [{"name": "a", "path": str(site)}],
            "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "max_case_megavoxels": 0.004},
        }
    )
    settings = plan_preprocessing(cfg)
    assert settings.max_megavoxels == 0.004
    case = load_site(site).cases[0]
    with pytest.raises(ImageReadError, match="more than the limit of 0.004"):
        preprocess_case(case, settings)


def test_preprocessing_refuses_non_finite_and_fractional_labels_built_in_memory() -> None:
    settings = PreprocessSettings(("T1",), (1.0, 1.0, 1.0), patch_size=(8, 8, 8))
    data = bad.volume((12, 12, 12))[None]
    data[0, 5, 5, 5] = NAN  # was silently set to 0 by nan_to_num
    with pytest.raises(PreprocessingError, match="1 NaN or infinite voxel"):
        preprocess_images({"T1": Image(data, np.eye(4))}, settings, case_id="c")
    label = np.zeros((1, 12, 12, 12), np.float32)
    label[0, 4:8, 4:8, 4:8] = 0.5  # was silently rounded
    img = Image(bad.volume((12, 12, 12))[None], np.eye(4))
    with pytest.raises(PreprocessingError, match=r"non-integer values, e\.g\. \[0\.5\]"):
        preprocess_images({"T1": img}, settings, Image(label, np.eye(4)), case_id="c")
