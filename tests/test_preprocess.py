"""Preprocessing pipeline, geometry round trips, the case cache and `fedmed data preprocess`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import fedmed.data.preprocess as pp
from fedmed.config import config_from_dict
from fedmed.data.formats import Case, ModalityFile, load_site
from fedmed.data.io import Image
from fedmed.errors import ConfigError, PreprocessingError

os.environ.setdefault("OMP_NUM_THREADS", "1")

# --------------------------------------------------------------------------- helpers

# A "head" ellipsoid (image foreground) around a "tissue" ellipsoid (label 1), in world mm.
HEAD_RADII = np.array([30.0, 26.0, 33.0])
TISSUE_CENTRE = np.array([3.0, 2.0, 0.0])
TISSUE_RADII = np.array([22.0, 18.0, 25.0])


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def grid_affine(
    axes: np.ndarray, spacing: Sequence[float], shape: Sequence[int], centre=(1.0, -2.0, 3.0)
) -> np.ndarray:
    """Voxel->RAS affine with direction columns ``axes`` whose grid centre sits at ``centre``."""
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(axes, dtype=float) @ np.diag(spacing)
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def world_object(affine: np.ndarray, shape: Sequence[int], lesion: bool = False):
    """Sample the analytic object on a grid: image (1,X,Y,Z) float32, label (1,X,Y,Z) float32."""
    idx = np.indices(shape).reshape(3, -1)
    w = (affine[:3, :3] @ idx + affine[:3, 3:4]).T
    head = ((w / HEAD_RADII) ** 2).sum(1) <= 1
    tissue = (((w - TISSUE_CENTRE) / TISSUE_RADII) ** 2).sum(1) <= 1
    img = (100.0 * head + 80.0 * tissue).reshape(shape).astype(np.float32)
    lab = tissue.astype(np.float32)
    if lesion:
        les = (((w - np.array([-8.0, -4.0, 6.0])) / 3.0) ** 2).sum(1) <= 1
        lab[les] = 2
    return img[None], lab.reshape(shape)[None]


def dice(a: np.ndarray, b: np.ndarray, cls: int = 1) -> float:
    x, y = np.asarray(a) == cls, np.asarray(b) == cls
    return float(2 * (x & y).sum() / max(x.sum() + y.sum(), 1))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def write_case(root: Path, case_id: str, affine, shape, modalities=("T1", "T2")) -> Case:
    img, lab = world_object(affine, shape)
    images = {}
    for k, m in enumerate(modalities):
        p = write_nifti(root / case_id / f"{m}.nii.gz", img * (1 + k), affine)
        images[m] = ModalityFile(p)
    lp = write_nifti(root / case_id / "label.nii.gz", lab.astype(np.uint8), affine)
    return Case(case_id, images, lp)


def small_case(root: Path, case_id: str = "c0") -> Case:
    return write_case(root, case_id, grid_affine(RAS, (2, 2, 2), (30, 28, 34)), (30, 28, 34))


def settings(spacing=(2.0, 2.0, 2.0), modalities=("T1", "T2"), patch=(16, 16, 16), **kw):
    return pp.PreprocessSettings(
        modalities=tuple(modalities), target_spacing=spacing, patch_size=patch, **kw
    )


RAS = np.eye(3)
LPS = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = rotation(2, 20.0) @ rotation(0, 10.0)
# Anisotropic, non-RAS axis order: array axes point R, S, P.
ASA = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])


@pytest.fixture
def counting_reader(monkeypatch):
    """Count calls to the image reader the pipeline uses."""
    calls: list[Path] = []
    real = pp.read_image

    def reader(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(pp, "read_image", reader)
    return calls


# --------------------------------------------------------------------------- settings


def _cfg(tmp_path: Path, **pre) -> object:
    return config_from_dict(
        {
            "modalities": ["T1", "T2"],
            "labels": {0: "background", 1: "tissue"},
            "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
            "preprocessing": pre,
        },
        root=tmp_path,
    )


def test_settings_from_config_precedence(tmp_path):
    cfg = _cfg(tmp_path, target_spacing=[1.5, 1.5, 2.0], normalization={"T2": {"kind": "none"}})
    s = pp.PreprocessSettings.from_config(cfg)
    assert s.target_spacing == (1.5, 1.5, 2.0)
    assert [n.kind for n in s.normalization] == ["zscore", "none"]
    explicit = pp.PreprocessSettings.from_config(cfg, target_spacing=(3, 3, 3))
    assert explicit.target_spacing == (3.0, 3.0, 3.0)
    assert explicit.key() != s.key()
    assert pp.PreprocessSettings.from_config(cfg).key() == s.key()
    with pytest.raises(ConfigError, match="fedmed data check"):
        pp.PreprocessSettings.from_config(_cfg(tmp_path))


def test_settings_planned_from_fingerprints(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="fingerprint"):
        pp.settings_for(cfg)
    for name, ms in (("a", [1.0, 1.0, 3.0]), ("b", [1.4, 1.2, 1.0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "fingerprint.json").write_text(
            json.dumps({"site": name, "median_spacing": ms})
        )
    s = pp.settings_for(cfg)
    assert s.target_spacing == pytest.approx((1.2, 1.1, 2.0))


# --------------------------------------------------------------------------- pipeline


def test_normalisation_orientation_spacing_and_padding():
    aff = grid_affine(LPS, (1.0, 1.0, 3.0), (40, 36, 14))
    img, lab = world_object(aff, (40, 36, 14))
    ct = img * 10 - 1000  # "HU": background -1000
    s = pp.PreprocessSettings(
        modalities=("MR", "CT"),
        target_spacing=(2.0, 2.0, 2.0),
        normalization=(pp.ModalityNormalization(), pp.ModalityNormalization("ct_window", (0, 500))),
        patch_size=(32, 32, 48),
    )
    pre = pp.preprocess_images(
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
    pre = pp.preprocess_images({"T1": Image(img, aff)}, settings(modalities=("T1",)), None)
    assert pre.label is None
    expected = np.ceil(2 * HEAD_RADII / 2.0) + 2 * pp.FOREGROUND_MARGIN
    assert np.all(np.abs(np.asarray(pre.spatial_shape) - expected) <= 2)


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
    pre = pp.preprocess_images({"T1": Image(img, aff)}, s, Image(lab, aff))
    assert nib.aff2axcodes(pre.affine) == ("R", "A", "S")
    back = pp.resample_label_to(pre.label, pre.affine, aff, shape)
    assert back.shape == tuple(shape)
    assert dice(back, lab[0]) >= 0.95


def test_resample_label_to_identity_and_shift():
    lab = np.zeros((1, 10, 12, 14), np.uint8)
    lab[0, 2:5, 3:7, 4:9] = 3
    aff = grid_affine(OBLIQUE, (1.0, 2.0, 1.5), lab.shape[1:])
    assert np.array_equal(pp.resample_label_to(lab, aff, aff, lab.shape[1:]), lab[0])
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, 0]  # target voxel i sits at source voxel i + 1
    out = pp.resample_label_to(lab, aff, shifted, lab.shape[1:])
    assert np.array_equal(out[:-1], lab[0, 1:]) and out.dtype == np.uint8


def test_lps_thick_slices_and_ras_align_in_world_space(tmp_path):
    """The same world object acquired LPS 1x1x3 mm and RAS 1.2 mm comes out aligned."""
    s = settings(spacing=(1.5, 1.5, 1.5), modalities=("T1", "T2"))
    a_aff = grid_affine(LPS, (1, 1, 3), (70, 62, 26))
    a = write_case(tmp_path / "site-lps", "c0", a_aff, (70, 62, 26))
    b_aff = grid_affine(RAS, (1.2, 1.2, 1.2), (58, 52, 64), centre=(-2.0, 1.0, 0.0))
    b = write_case(tmp_path / "site-ras", "c0", b_aff, (58, 52, 64))
    pa, pb = pp.preprocess_case(a, s), pp.preprocess_case(b, s)
    for pre in (pa, pb):
        assert nib.aff2axcodes(pre.affine) == ("R", "A", "S")
        assert pre.spacing == pytest.approx((1.5, 1.5, 1.5))
        assert pre.image.shape[0] == 2
    on_b = pp.resample_label_to(pa.label, pa.affine, pb.affine, pb.spatial_shape)
    assert dice(on_b, pb.label[0]) >= 0.95


def test_missing_modality_is_zero_channel(tmp_path):
    aff = grid_affine(RAS, (2.0, 2.0, 2.0), (36, 32, 36))
    case = write_case(tmp_path, "c0", aff, (36, 32, 36), modalities=("T1", "FLAIR"))
    case = Case(case.case_id, case.images, case.label, missing=("T2",))
    pre = pp.preprocess_case(case, settings(modalities=("T1", "T2", "FLAIR")))
    assert pre.image.shape[0] == 3
    assert pre.available.tolist() == [True, False, True]
    assert not pre.image[1].any()
    assert pre.image[0].any() and pre.image[2].any()


def test_modalities_on_different_grids_are_resampled_onto_the_first():
    aff1 = grid_affine(RAS, (2.0, 2.0, 2.0), (36, 32, 36))
    aff2 = grid_affine(LPS, (1.5, 1.5, 2.5), (44, 40, 30), centre=(0.5, -1.0, 2.0))
    img1, lab = world_object(aff1, (36, 32, 36))
    img2, _ = world_object(aff2, (44, 40, 30))
    pre = pp.preprocess_images(
        {"T1": Image(img1, aff1), "T2": Image(img2, aff2)}, settings(), Image(lab, aff1)
    )
    fg1, fg2 = pre.image[0] > 0.5, pre.image[1] > 0.5  # the bright tissue in both channels
    assert dice(fg1.astype(int), fg2.astype(int)) >= 0.9
    assert dice(fg1.astype(int), pre.label[0]) >= 0.9


def test_empty_image_and_unknown_modality_raise():
    aff = np.eye(4)
    zeros = Image(np.zeros((1, 8, 8, 8), np.float32), aff)
    with pytest.raises(PreprocessingError, match="zero"):
        pp.preprocess_images({"T1": zeros}, settings(modalities=("T1",)))
    with pytest.raises(PreprocessingError, match="PD"):
        pp.preprocess_images({"PD": zeros}, settings(modalities=("T1",)))
    with pytest.raises(PreprocessingError, match="none of"):
        pp.preprocess_images({}, settings(modalities=("T1",)))


def test_four_d_msd_file_read_once(tmp_path, make_site, counting_reader):
    site = make_site(tmp_path / "msd", fmt="msd", n_cases=1, shape=(16, 16, 16))
    manifest = load_site(site, expected_modalities=("T1", "T2", "FLAIR"))
    pre = pp.preprocess_case(manifest.cases[0], settings(modalities=("T1", "T2", "FLAIR")))
    assert pre.available.all() and pre.image.shape[0] == 3
    assert len(counting_reader) == 2  # the 4D image once, the label once


# --------------------------------------------------------------------------- cache


def test_cache_hit_does_not_read_images(tmp_path, counting_reader):
    case = small_case(tmp_path / "site")
    s = settings()
    first = pp.CaseCache(tmp_path / "cache", s).get(case)
    assert len(counting_reader) == 3
    cache = pp.CaseCache(tmp_path / "cache", s)
    second = cache.get(case)
    assert len(counting_reader) == 3 and cache.hits == 1 and cache.misses == 0
    assert isinstance(second.image, np.memmap)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    np.testing.assert_allclose(first.affine, second.affine)
    assert second.available.tolist() == [True, True] and second.case_id == "c0"
    entries = [p for p in cache.root.iterdir()]
    assert len(entries) == 1 and cache.root.parent == tmp_path / "cache"


def test_cache_invalidated_by_file_change_and_settings(tmp_path, counting_reader):
    aff = grid_affine(RAS, (2, 2, 2), (30, 28, 34))
    case = write_case(tmp_path / "site", "c0", aff, (30, 28, 34))
    cache = pp.CaseCache(tmp_path / "cache", settings())
    before = cache.get(case)
    assert cache.misses == 1
    # Rewrite T2 with other content and a later mtime.
    img, _ = world_object(aff, (30, 28, 34))
    t2 = case.images["T2"].path
    write_nifti(t2, img * 7 + 50 * (img > 0), aff)
    st = t2.stat()
    os.utime(t2, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = cache.get(case)
    assert cache.misses == 2 and len(counting_reader) == 6
    assert not np.array_equal(before.image[1], after.image[1])
    assert len(list(cache.root.iterdir())) == 1  # the stale entry was replaced
    assert cache.get(case) is not None and cache.hits == 1
    other = pp.CaseCache(tmp_path / "cache", settings(spacing=(2.5, 2.5, 2.5)))
    assert not other.contains(case)
    pre = other.get(case)
    assert other.misses == 1 and pre.spacing == pytest.approx((2.5, 2.5, 2.5))


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    case = small_case(tmp_path / "site")
    cache = pp.CaseCache(tmp_path / "cache", settings())
    real_save = np.save
    calls = {"n": 0}

    def dying_save(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # killed while writing the label
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(pp.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.get(case)
    monkeypatch.setattr(pp.np, "save", real_save)
    assert not cache.contains(case)
    assert list(cache.root.iterdir()) == []  # neither a partial entry nor a temp folder
    assert cache.get(case).label is not None and cache.contains(case)


def test_preprocess_site_counts_hits_and_failures(tmp_path):
    aff = grid_affine(RAS, (2, 2, 2), (30, 28, 34))
    for i in range(2):
        write_case(tmp_path / "site", f"c{i}", aff, (30, 28, 34))
    (tmp_path / "site" / "c2").mkdir()
    (tmp_path / "site" / "c2" / "T1.nii.gz").write_bytes(b"not a nifti")
    manifest = load_site(tmp_path / "site", expected_modalities=("T1", "T2"))
    s = settings()
    first = pp.preprocess_site(manifest, s, progress=False)
    assert (first.cases, first.hits, first.misses) == (3, 0, 2)
    assert [f[0] for f in first.failed] == ["c2"]
    assert first.cache_dir == tmp_path / "site" / ".fedmed-cache" / s.key()
    assert first.missing_channels == {"T1": 0, "T2": 0}
    second = pp.preprocess_site(manifest, s, cache_dir=None, progress=False)
    assert (second.hits, second.misses) == (2, 0)
    assert second.min_shape is not None and min(second.min_shape) >= 16


# --------------------------------------------------------------------------- CLI


def test_cli_preprocess(tmp_path, make_site, capsys):
    from fedmed.cli.main import main

    site = make_site(tmp_path / "site-a", fmt="nnunet", n_cases=2, shape=(16, 16, 16))
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "modalities": ["T1", "T2", "FLAIR"],
                "labels": {0: "background", 1: "tissue", 2: "lesion"},
                "sites": [{"name": "site-a", "path": "site-a"}],
                "preprocessing": {"patch_size": [16, 16, 16]},
            }
        )
    )
    # No target spacing and no fingerprint: a readable error, exit 1.
    assert main(["data", "preprocess", str(site), "--config", str(cfg)]) == 1
    assert "fedmed data check" in capsys.readouterr().err
    (site / "fingerprint.json").write_text(json.dumps({"median_spacing": [2.0, 2.0, 2.5]}))
    cache = tmp_path / "cache"
    args = ["data", "preprocess", str(site), "--config", str(cfg), "--cache-dir", str(cache)]
    assert main([*args, "--site", "site-a"]) == 0
    out = capsys.readouterr().out
    assert "preprocessed now: 2" in out and "2 x 2 x 2.5" in out and "RAS" in out
    assert main(args) == 0
    assert "cached already: 2" in capsys.readouterr().out
    assert len([p for p in next(cache.iterdir()).iterdir()]) == 2


def test_unwritable_cache_dir_is_a_readable_error(tmp_path):
    case = small_case(tmp_path / "site")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    with pytest.raises(PreprocessingError, match="--cache-dir"):
        pp.CaseCache(blocker, settings()).get(case)


def test_noisy_background_is_cropped_and_excluded_from_zscore():
    """MR scans have noise outside the head: the crop must still find the head."""
    rng = np.random.default_rng(0)
    aff = grid_affine(RAS, (2.0, 2.0, 2.0), (48, 48, 48))
    img = np.abs(rng.normal(0, 3.0, size=(1, 48, 48, 48))).astype(np.float32)  # noise floor
    img[0, 14:34, 16:32, 18:30] += 100.0  # the "head": 20 x 16 x 12 voxels
    s = pp.PreprocessSettings(
        modalities=("MR",), target_spacing=(2.0, 2.0, 2.0),
        normalization=(pp.ModalityNormalization(),), patch_size=(8, 8, 8),
    )
    pre = pp.preprocess_images({"MR": Image(img, aff)}, s, case_id="noisy")
    margin = 2 * pp.FOREGROUND_MARGIN
    assert pre.spatial_shape == (20 + margin, 16 + margin, 12 + margin)
    m = pp.FOREGROUND_MARGIN
    head = pre.image[0, m:-m, m:-m, m:-m]
    assert head.mean() == pytest.approx(0.0, abs=1e-3)
    assert head.std() == pytest.approx(1.0, abs=1e-2)


def test_otsu_threshold_separates_two_populations():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(40, 8, 50_000), rng.normal(300, 40, 20_000)])
    t = pp.otsu_threshold(values)
    assert 80 < t < 220


def test_labels_from_probabilities_on_same_grid_is_the_argmax():
    rng = np.random.default_rng(3)
    probs = rng.random((4, 10, 12, 9)).astype(np.float32)
    aff = grid_affine(LPS, (1.5, 1.0, 2.0), (10, 12, 9))
    out = pp.labels_from_probabilities_on(probs, aff, aff, (10, 12, 9))
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
    linear = pp.labels_from_probabilities_on(probs, coarse, fine, (60, 60, 60))
    nearest = pp.resample_label_to(lab_coarse, coarse, fine, (60, 60, 60))
    assert dice(linear, lab_fine[0]) > dice(nearest, lab_fine[0])
    assert dice(linear, lab_fine[0]) >= 0.9
