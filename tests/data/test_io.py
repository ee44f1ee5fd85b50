"""Image I/O: world coordinates survive write -> read in every format and orientation."""

from __future__ import annotations

import locale
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fedmed.data.io import (
    Image,
    image_suffix,
    is_image_path,
    read_image,
    world_coordinates,
    write_image,
    write_label_like,
)
from fedmed.errors import ImageReadError, ImageWriteError

SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
SPACING = (0.7, 1.3, 2.9)  # anisotropic on purpose: a swapped axis changes the geometry


def _oblique(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    """Rotated 20 degrees about z and 10 about x: no axis is aligned with the world."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing)
    aff[:3, 3] = [12.5, -30.0, 7.25]
    return aff


@pytest.fixture(params=["RAS", "LPS", "LIA", "PSR", "oblique"])
def affine(request: pytest.FixtureRequest, make_affine: Callable[..., np.ndarray]) -> np.ndarray:
    if request.param == "oblique":
        return _oblique()
    return make_affine(SPACING, request.param, origin=(12.5, -30.0, 7.25))


def _volume(shape: tuple[int, ...] = (7, 9, 11), seed: int = 0) -> np.ndarray:
    # Distinct values everywhere, so any axis flip or transpose changes the array.
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _independent_world(path: Path, index: tuple[int, int, int]) -> np.ndarray:
    """World RAS position of a voxel according to the format's own library."""
    if image_suffix(path) in (".nii", ".nii.gz"):
        return nib.affines.apply_affine(nib.load(str(path)).affine, index)
    img = sitk.ReadImage(str(path))
    lps = np.asarray(img.TransformIndexToPhysicalPoint([int(i) for i in index]))
    return lps * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_preserves_world_coordinates(
    suffix: str, affine: np.ndarray, tmp_path: Path
) -> None:
    arr = _volume()
    path = write_image(tmp_path / f"img{suffix}", arr, affine)
    img = read_image(path)
    assert img.array.shape == (1, *arr.shape) and img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array[0], arr)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_allclose(img.spacing, SPACING, atol=1e-5)
    assert img.spatial_shape == arr.shape
    # The file says the same as the format's own library, voxel for voxel (corners + inside).
    for index in [(0, 0, 0), (6, 8, 10), (3, 1, 7), (6, 0, 10)]:
        np.testing.assert_allclose(
            _independent_world(path, index),
            nib.affines.apply_affine(affine, index),
            atol=1e-3,
        )
    np.testing.assert_allclose(
        world_coordinates(img.affine, img.spatial_shape),
        world_coordinates(affine, arr.shape),
        atol=1e-3,
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_multichannel_round_trip(suffix: str, tmp_path: Path) -> None:
    arr = np.stack([_volume(seed=s) for s in range(3)])
    img = read_image(write_image(tmp_path / f"mc{suffix}", arr, _oblique()))
    assert img.array.shape == (3, 7, 9, 11)
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.affine, _oblique(), atol=1e-4)


def test_nifti_vector_image_5d_reads_as_channels(tmp_path: Path) -> None:
    arr = np.stack([_volume(seed=s) for s in range(2)], axis=-1)[:, :, :, None, :]
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "v.nii.gz"))
    img = read_image(tmp_path / "v.nii.gz")
    assert img.array.shape == (2, 7, 9, 11)
    np.testing.assert_array_equal(img.array[1], arr[:, :, :, 0, 1])


def _write_dicom_series(folder: Path, vol_zyx: np.ndarray, affine_lps: np.ndarray) -> None:
    """One file per slice with the tags a reader needs to rebuild the geometry."""
    folder.mkdir(parents=True)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    direction = affine_lps[:3, :3] / spacing
    img = sitk.GetImageFromArray(vol_zyx)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin(affine_lps[:3, 3].tolist())
    uid = "1.2.826.0.1.3680043.2.1125.99"
    orientation = "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved = locale.setlocale(locale.LC_ALL)  # ITK's DICOM writer switches the locale to C
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR image storage
            "0008|0018": f"{uid}.3.{k}",
            "0008|0060": "MR",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # row, column spacing
            "0018|0050": f"{spacing[2]:.6f}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, saved)


def test_dicom_series_folder(tmp_path: Path) -> None:
    vol = (np.random.default_rng(1).random((6, 9, 8)) * 1000).astype(np.int16)  # (Z, Y, X)
    ras = _oblique((0.8, 0.9, 2.5))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    folder = tmp_path / "series"
    _write_dicom_series(folder, vol, lps)
    assert is_image_path(folder)
    img = read_image(folder)
    assert img.array.shape == (1, 8, 9, 6)
    np.testing.assert_array_equal(img.array[0], vol.transpose(2, 1, 0).astype(np.float32))
    np.testing.assert_allclose(img.spacing, (0.8, 0.9, 2.5), atol=1e-4)
    np.testing.assert_allclose(img.affine, ras, atol=1e-4)


def test_folder_without_dicom_series_raises(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("not dicom")
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_image(tmp_path / "notes")


def _nifti_with_codes(path: Path, qcode: int, scode: int) -> Image:
    data = _volume()
    aff = _oblique()
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=qcode)
    img.set_sform(aff, code=scode)
    nib.save(img, str(path))
    return read_image(path)


@pytest.mark.parametrize(("qcode", "scode"), [(1, 1), (2, 4), (1, 0), (0, 2)])
def test_write_label_like_keeps_geometry_and_codes(qcode: int, scode: int, tmp_path: Path) -> None:
    ref = _nifti_with_codes(tmp_path / "img.nii.gz", qcode, scode)
    label = (ref.array[0] > 0.5).astype(np.int64) + (ref.array[0] > 0.9)
    out = write_label_like(tmp_path / "lab.nii.gz", label, ref)
    back = nib.load(str(out))
    assert back.shape == ref.spatial_shape
    assert int(back.header["qform_code"]) == qcode
    assert int(back.header["sform_code"]) == scode
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-5)
    assert np.issubdtype(back.get_data_dtype(), np.integer)
    np.testing.assert_array_equal(np.asarray(back.dataobj), label)
    # And it reads back through fedmed in the same world grid.
    np.testing.assert_allclose(read_image(out).affine, ref.affine, atol=1e-5)


def test_write_label_like_accepts_channel_axis_and_rejects_wrong_shape(tmp_path: Path) -> None:
    ref = _nifti_with_codes(tmp_path / "img.nii", 1, 1)
    out = write_label_like(tmp_path / "lab.nii", np.ones((1, 7, 9, 11), np.uint8), ref)
    assert nib.load(str(out)).shape == (7, 9, 11)
    with pytest.raises(ImageWriteError, match="differs from the reference"):
        write_label_like(tmp_path / "bad.nii", np.ones((7, 9, 10), np.uint8), ref)


def test_write_label_like_from_sitk_reference(tmp_path: Path) -> None:
    ref = read_image(write_image(tmp_path / "img.mha", _volume(), _oblique()))
    out = write_label_like(tmp_path / "lab.nii.gz", np.zeros((7, 9, 11), np.uint8), ref)
    np.testing.assert_allclose(nib.load(str(out)).affine, _oblique(), atol=1e-4)


def test_reference_with_another_affine_does_not_override_it(tmp_path: Path) -> None:
    ref = _nifti_with_codes(tmp_path / "img.nii.gz", 2, 2)
    moved = ref.affine.copy()
    moved[:3, 3] += [5.0, 0.0, 0.0]
    img = read_image(write_image(tmp_path / "moved.nii.gz", ref.array, moved, reference=ref))
    np.testing.assert_allclose(img.affine, moved, atol=1e-5)
    assert (img.header["qform_code"], img.header["sform_code"]) == (2, 2)


def test_boolean_masks_are_written_as_uint8(tmp_path: Path) -> None:
    mask = _volume() > 0.5
    img = read_image(write_image(tmp_path / "m.nii.gz", mask, np.eye(4)))
    np.testing.assert_array_equal(img.array[0], mask.astype(np.float32))


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_read_2d_image(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"slice{suffix}"
    if suffix == ".mha":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(path))
    else:
        nib.save(nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), str(path))
    with pytest.raises(ImageReadError, match="3D"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_read_truncated_file(suffix: str, tmp_path: Path) -> None:
    path = write_image(tmp_path / f"img{suffix}", _volume((16, 16, 16)), np.eye(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="corrupt"):
        read_image(path)


@pytest.mark.parametrize("name", ["report.nii.gz", "report.nii", "report.mha"])
def test_read_non_image_file(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_text("Findings: none.\n" * 40)
    with pytest.raises(ImageReadError, match=name):
        read_image(tmp_path / name)


def test_read_wrong_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match="unsupported image format '.png'"):
        read_image(path)


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageWriteError, match="unsupported suffix"):
        write_image(tmp_path / "x.png", _volume(), np.eye(4))
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ImageWriteError, match=r"\(C, X, Y, Z\)"):
        write_image(tmp_path / "x.nii.gz", np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ImageWriteError, match="4x4"):
        write_image(tmp_path / "x.nii.gz", _volume(), np.eye(3))


def test_suffix_helpers(tmp_path: Path) -> None:
    assert image_suffix(Path("a/B.NII.GZ")) == ".nii.gz"
    assert image_suffix(Path("a/b.mhd")) == ".mhd"
    assert is_image_path(Path("x.nrrd"))
    assert not is_image_path(Path("x.txt"))
