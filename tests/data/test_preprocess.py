"""The per-case preprocessing pipeline: RAS, spacing, foreground, crop, normalisation, pad."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fedmed.data.formats import Case, load_site
from fedmed.data.io import Image
from fedmed.data.planning import ModalityNormalization, PreprocessSettings
from fedmed.data.preprocess import (
    FOREGROUND_MARGIN,
    otsu_threshold,
    preprocess_case,
    preprocess_images,
)
from fedmed.errors import PreprocessingError
from tests.support.grids import (
    HEAD_RADII,
    LPS,
    RAS,
    dice,
    grid_affine,
    settings,
    world_object,
    write_case,
)


def test_normalisation_orientation_spacing_and_padding():
    aff = grid_affine(LPS, (1.0, 1.0, 3.0), (40, 36, 14))
    img, lab = world_object(aff, (40, 36, 14))
    ct = img * 10 - 1000  # "HU": background -1000
    s = PreprocessSettings(
        modalities=("MR", "CT"),
        target_spacing=(2.0, 2.0, 2.0),
        normalization=(ModalityNormalization(), ModalityNormalization("ct_window", (0, 500))),
        patch_size=(32, 32, 48),
    )
    pre = preprocess_images(
        {"MR": Image(img, aff), "CT": Image(ct, aff)}, s, Image(lab, aff), case_id="x"
    )
    assert pre.image.dtype == np.float32 and pre.label.dtype == np.uint8
    assert pre.image.shape[0] == 2 and pre.label.shape == (1, *pre.image.shape[1:])
    assert nib.aff2axcodes(pre.affine) == ("R", "A", "S")
    assert pre.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert all(n >= p for n, p in zip(pre.spatial_shape, (32, 32, 48), strict=True))
    assert pre.spatial_shape[2] == 48  # z (40 mm of foreground) was padded to the patch
    # A masked scan (exact zeros outside the object): z-score over the nonzero voxels,
    # and the zeros stay zero.
    mr = pre.image[0][pre.image[0] != 0]
    assert mr.mean() == pytest.approx(0.0, abs=1e-3) and mr.std() == pytest.approx(1.0, abs=1e-2)
    assert pre.image[1].min() >= 0.0 and pre.image[1].max() <= 1.0
    assert pre.image[1].max() == pytest.approx(1.0)
    assert pre.available.tolist() == [True, True]


def test_crop_to_foreground():
    aff = grid_affine(RAS, (2.0, 2.0, 2.0), (60, 60, 60))  # 120 mm field, 60-66 mm head
    img, lab = world_object(aff, (60, 60, 60))
    pre = preprocess_images({"T1": Image(img, aff)}, settings(modalities=("T1",)), None)
    assert pre.label is None
    expected = np.ceil(2 * HEAD_RADII / 2.0) + 2 * FOREGROUND_MARGIN
    assert np.all(np.abs(np.asarray(pre.spatial_shape) - expected) <= 2)



def test_missing_modality_is_zero_channel(tmp_path):
    aff = grid_affine(RAS, (2.0, 2.0, 2.0), (36, 32, 36))
    case = write_case(tmp_path, "c0", aff, (36, 32, 36), modalities=("T1", "FLAIR"))
    case = Case(case.case_id, case.images, case.label, missing=("T2",))
    pre = preprocess_case(case, settings(modalities=("T1", "T2", "FLAIR")))
    assert pre.image.shape[0] == 3
    assert pre.available.tolist() == [True, False, True]
    assert not pre.image[1].any()
    assert pre.image[0].any() and pre.image[2].any()


def test_modalities_on_different_grids_are_resampled_onto_the_first():
    aff1 = grid_affine(RAS, (2.0, 2.0, 2.0), (36, 32, 36))
    aff2 = grid_affine(LPS, (1.5, 1.5, 2.5), (44, 40, 30), centre=(0.5, -1.0, 2.0))
    img1, lab = world_object(aff1, (36, 32, 36))
    img2, _ = world_object(aff2, (44, 40, 30))
    pre = preprocess_images(
        {"T1": Image(img1, aff1), "T2": Image(img2, aff2)}, settings(), Image(lab, aff1)
    )
    fg1, fg2 = pre.image[0] > 0.5, pre.image[1] > 0.5  # the bright tissue in both channels
    assert dice(fg1.astype(int), fg2.astype(int)) >= 0.9
    assert dice(fg1.astype(int), pre.label[0]) >= 0.9


def test_empty_image_and_unknown_modality_raise():
    aff = np.eye(4)
    zeros = Image(np.zeros((1, 8, 8, 8), np.float32), aff)
    with pytest.raises(PreprocessingError, match="zero"):
        preprocess_images({"T1": zeros}, settings(modalities=("T1",)))
    with pytest.raises(PreprocessingError, match="PD"):
        preprocess_images({"PD": zeros}, settings(modalities=("T1",)))
    with pytest.raises(PreprocessingError, match="none of"):
        preprocess_images({}, settings(modalities=("T1",)))


def test_four_d_msd_file_read_once(tmp_path, make_site, counting_reader):
    site = make_site(tmp_path / "msd", fmt="msd", n_cases=1, shape=(16, 16, 16))
    manifest = load_site(site, expected_modalities=("T1", "T2", "FLAIR"))
    pre = preprocess_case(manifest.cases[0], settings(modalities=("T1", "T2", "FLAIR")))
    assert pre.available.all() and pre.image.shape[0] == 3
    assert len(counting_reader) == 2  # the 4D image once, the label once



def test_noisy_background_is_cropped_and_excluded_from_zscore():
    """MR scans have noise outside the head: the crop must still find the head."""
    rng = np.random.default_rng(0)
    aff = grid_affine(RAS, (2.0, 2.0, 2.0), (48, 48, 48))
    img = np.abs(rng.normal(0, 3.0, size=(1, 48, 48, 48))).astype(np.float32)  # noise floor
    img[0, 14:34, 16:32, 18:30] += 100.0  # the "head": 20 x 16 x 12 voxels
    s = PreprocessSettings(
        modalities=("MR",), target_spacing=(2.0, 2.0, 2.0),
        normalization=(ModalityNormalization(),), patch_size=(8, 8, 8),
    )
    pre = preprocess_images({"MR": Image(img, aff)}, s, case_id="noisy")
    margin = 2 * FOREGROUND_MARGIN
    assert pre.spatial_shape == (20 + margin, 16 + margin, 12 + margin)
    m = FOREGROUND_MARGIN
    head = pre.image[0, m:-m, m:-m, m:-m]
    assert head.mean() == pytest.approx(0.0, abs=1e-3)
    assert head.std() == pytest.approx(1.0, abs=1e-2)


def test_otsu_threshold_separates_two_populations():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(40, 8, 50_000), rng.normal(300, 40, 20_000)])
    t = otsu_threshold(values)
    assert 80 < t < 220




def test_isolated_bright_voxels_do_not_widen_the_crop():
    """Only the largest connected foreground component sets the crop (MONAI's helper)."""
    rng = np.random.default_rng(2)
    aff = grid_affine(RAS, (2.0, 2.0, 2.0), (48, 48, 48))
    img = np.abs(rng.normal(0, 3.0, size=(1, 48, 48, 48))).astype(np.float32)
    img[0, 14:34, 16:32, 18:30] += 100.0
    img[0, 2, 2, 2] = img[0, 45, 45, 45] = 150.0  # two far, isolated "head"-bright voxels
    s = PreprocessSettings(
        modalities=("MR",), target_spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8),
    )
    pre = preprocess_images({"MR": Image(img, aff)}, s, case_id="specks")
    margin = 2 * FOREGROUND_MARGIN
    assert pre.spatial_shape == (20 + margin, 16 + margin, 12 + margin)
