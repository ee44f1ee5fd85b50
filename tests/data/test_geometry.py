"""Labels and probabilities back onto another grid, through world coordinates."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fedmed.data.geometry import labels_from_probabilities_on, resample_label_to
from fedmed.data.io import Image
from fedmed.data.preprocess import preprocess_case, preprocess_images
from tests.support.grids import (
    ASA,
    LPS,
    OBLIQUE,
    RAS,
    dice,
    grid_affine,
    settings,
    world_object,
    write_case,
)


@pytest.mark.parametrize(
    "axes,spacing,shape",
    [(LPS, (1.0, 1.0, 3.0), (64, 56, 24)), (OBLIQUE, (1.1, 0.9, 1.3), (66, 72, 60)),
     (ASA, (0.8, 2.5, 0.8), (84, 30, 90))],
    ids=["lps", "oblique", "anisotropic"],
)
def test_resample_label_to_round_trip(axes, spacing, shape):
    aff = grid_affine(axes, spacing, shape)
    img, lab = world_object(aff, shape)
    s = settings(spacing=(1.5, 1.5, 1.5), modalities=("T1",))
    pre = preprocess_images({"T1": Image(img, aff)}, s, Image(lab, aff))
    assert nib.aff2axcodes(pre.affine) == ("R", "A", "S")
    back = resample_label_to(pre.label, pre.affine, aff, shape)
    assert back.shape == tuple(shape)
    assert dice(back, lab[0]) >= 0.95


def test_resample_label_to_identity_and_shift():
    lab = np.zeros((1, 10, 12, 14), np.uint8)
    lab[0, 2:5, 3:7, 4:9] = 3
    aff = grid_affine(OBLIQUE, (1.0, 2.0, 1.5), lab.shape[1:])
    assert np.array_equal(resample_label_to(lab, aff, aff, lab.shape[1:]), lab[0])
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, 0]  # target voxel i sits at source voxel i + 1
    out = resample_label_to(lab, aff, shifted, lab.shape[1:])
    assert np.array_equal(out[:-1], lab[0, 1:]) and out.dtype == np.uint8


def test_lps_thick_slices_and_ras_align_in_world_space(tmp_path):
    """The same world object acquired LPS 1x1x3 mm and RAS 1.2 mm comes out aligned."""
    s = settings(spacing=(1.5, 1.5, 1.5), modalities=("T1", "T2"))
    a_aff = grid_affine(LPS, (1, 1, 3), (70, 62, 26))
    a = write_case(tmp_path / "site-lps", "c0", a_aff, (70, 62, 26))
    b_aff = grid_affine(RAS, (1.2, 1.2, 1.2), (58, 52, 64), centre=(-2.0, 1.0, 0.0))
    b = write_case(tmp_path / "site-ras", "c0", b_aff, (58, 52, 64))
    pa, pb = preprocess_case(a, s), preprocess_case(b, s)
    for pre in (pa, pb):
        assert nib.aff2axcodes(pre.affine) == ("R", "A", "S")
        assert pre.spacing == pytest.approx((1.5, 1.5, 1.5))
        assert pre.image.shape[0] == 2
    on_b = resample_label_to(pa.label, pa.affine, pb.affine, pb.spatial_shape)
    assert dice(on_b, pb.label[0]) >= 0.95



def test_labels_from_probabilities_on_same_grid_is_the_argmax():
    rng = np.random.default_rng(3)
    probs = rng.random((4, 10, 12, 9)).astype(np.float32)
    aff = grid_affine(LPS, (1.5, 1.0, 2.0), (10, 12, 9))
    out = labels_from_probabilities_on(probs, aff, aff, (10, 12, 9))
    assert out.dtype == np.uint8
    assert np.array_equal(out, probs.argmax(0))


def test_labels_from_probabilities_beat_nearest_on_a_finer_grid():
    """A ball predicted at 2 mm and exported to a 0.8 mm grid: interpolating the class
    probabilities follows the true surface better than nearest-neighbour labels."""
    coarse = grid_affine(RAS, (2.0, 2.0, 2.0), (30, 30, 30))
    fine = grid_affine(OBLIQUE, (0.8, 0.8, 0.8), (60, 60, 60))
    _, lab_coarse = world_object(coarse, (30, 30, 30))
    _, lab_fine = world_object(fine, (60, 60, 60))
    from scipy.ndimage import gaussian_filter

    soft = gaussian_filter(lab_coarse[0], 0.7)  # a smooth "probability" of the object
    probs = np.stack([1 - soft, soft])
    linear = labels_from_probabilities_on(probs, coarse, fine, (60, 60, 60))
    nearest = resample_label_to(lab_coarse, coarse, fine, (60, 60, 60))
    assert dice(linear, lab_fine[0]) > dice(nearest, lab_fine[0])
    assert dice(linear, lab_fine[0]) >= 0.9

