"""Analytic objects on arbitrary voxel grids, for the preprocessing, geometry and cache tests.

A "head" ellipsoid (image foreground) around a "tissue" ellipsoid (label 1), defined in
world mm, sampled on any grid (LPS, oblique, anisotropic), so that outputs can be compared
in world space whatever the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmed.data.formats import Case, ModalityFile
from fedmed.data.planning import PreprocessSettings

# A "head" ellipsoid (image foreground) around a "tissue" ellipsoid (label 1), in world mm.
HEAD_RADII = np.array([30.0, 26.0, 33.0])
TISSUE_CENTRE = np.array([3.0, 2.0, 0.0])
TISSUE_RADII = np.array([22.0, 18.0, 25.0])


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about array axis ``axis``."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


RAS = np.eye(3)
LPS = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = rotation(2, 20.0) @ rotation(0, 10.0)
# Anisotropic, non-RAS axis order: array axes point R, S, P.
ASA = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])


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



def settings(spacing=(2.0, 2.0, 2.0), modalities=("T1", "T2"), patch=(16, 16, 16), **kw: Any):
    """Small pipeline settings (default: T1 + T2, 2 mm, 16^3 patches)."""
    return PreprocessSettings(
        modalities=tuple(modalities), target_spacing=spacing, patch_size=patch, **kw
    )
