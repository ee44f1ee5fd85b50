"""Arrays onto another voxel grid through world coordinates (MONAI ``SpatialResample``).

A grid is a ``(4, 4)`` voxel-to-RAS affine plus a spatial shape ``(X, Y, Z)``. Every
function here maps a target voxel to the world point it sits at and samples the source
array there, so any pair of grids works (oblique, LPS-ordered, anisotropic); outside the
source grid the value is 0 (for probabilities: the background wins).

Used by the preprocessing (modalities on slightly different grids, a label on its own grid)
and by inference (a prediction back onto the input scan's grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmed.data.io import Image
from fedmed.errors import PreprocessingError

SAME_GRID_ATOL = 1e-3
"""Two grids whose affines agree to this (mm) are the same grid: nothing is resampled."""


def to_meta_tensor(array: np.ndarray, affine: np.ndarray) -> Any:
    """A ``(C, X, Y, Z)`` array as a MONAI ``MetaTensor`` carrying its voxel-to-RAS affine."""
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.as_tensor(affine))


def same_grid(image: Image, affine: np.ndarray, shape: Sequence[int]) -> bool:
    """Whether ``image`` (``(C, X, Y, Z)``) lies on the grid ``(affine, shape)``."""
    return image.spatial_shape == tuple(shape) and np.allclose(
        image.affine, affine, atol=SAME_GRID_ATOL
    )


def resample_onto(
    array: np.ndarray,
    affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str,
) -> np.ndarray:
    """A ``(C, X, Y, Z)`` array on ``affine`` resampled onto another grid.

    Args:
        array: ``(C, X, Y, Z)`` values on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-RAS matrix of ``array``.
        dst_affine: ``(4, 4)`` voxel-to-RAS matrix of the target grid.
        dst_shape: ``(X, Y, Z)`` of the target grid.
        mode: ``"bilinear"`` (intensities, probabilities) or ``"nearest"`` (labels).

    Returns:
        ``(C, X, Y, Z)`` float32 on the target grid (0 outside the source grid).
    """
    import torch
    from monai.transforms import SpatialResample

    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        to_meta_tensor(np.asarray(array, dtype=np.float32), affine),
        dst_affine=torch.as_tensor(dst_affine),
        spatial_size=[int(s) for s in dst_shape],
    )
    return np.asarray(out.detach().cpu().numpy(), dtype=np.float32)


def resample_label_to(
    label: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map into another grid via world coordinates.

    Each target voxel takes the label of the source voxel nearest to the same world point
    (0 outside the source).

    Args:
        label: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` integer labels on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-RAS matrix of ``label``.
        ref_affine: ``(4, 4)`` voxel-to-RAS matrix of the target grid.
        ref_shape: ``(X, Y, Z)`` of the target grid.

    Returns:
        ``(X, Y, Z)`` labels on the target grid, in ``label``'s integer dtype (uint8 for
        floating input).

    Raises:
        PreprocessingError: ``label`` is neither ``(1, X, Y, Z)`` nor ``(X, Y, Z)``.
    """
    lab = np.asarray(label)
    if lab.ndim == 4:
        lab = lab[0]
    if lab.ndim != 3:
        raise PreprocessingError(f"label must be (1, X, Y, Z) or (X, Y, Z), got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab).astype(np.uint8)
    out = resample_onto(lab[None], affine, ref_affine, ref_shape, "nearest")[0]
    return np.rint(out).astype(lab.dtype)


def labels_from_probabilities_on(
    probabilities: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
) -> np.ndarray:
    """Argmax on another grid of class probabilities resampled linearly (world coordinates).

    Interpolating probabilities, then taking the argmax on the target grid, keeps thin
    structures that nearest-neighbour resampling of a coarse label map loses. Outside the
    source grid the background (class 0) wins: its complement ``1 - p0`` is resampled with
    zero padding, which is the same as padding ``p0`` with ones, linear interpolation being
    linear. One class is resampled at a time, keeping a running maximum, so memory stays at
    two target-sized arrays.

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-RAS matrix of ``probabilities``.
        ref_affine: ``(4, 4)`` voxel-to-RAS matrix of the target grid.
        ref_shape: ``(X, Y, Z)`` of the target grid.

    Returns:
        ``(X, Y, Z)`` uint8 labels on the target grid.

    Raises:
        PreprocessingError: ``probabilities`` is not ``(K, X, Y, Z)``.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 4:
        raise PreprocessingError(f"probabilities must be (K, X, Y, Z), got {probs.shape}")
    shape = tuple(int(s) for s in ref_shape)
    best = np.full(shape, -1.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(probs.shape[0]):
        source = 1.0 - probs[k] if k == 0 else probs[k]
        p = resample_onto(source[None], affine, ref_affine, shape, "bilinear")[0]
        if k == 0:
            p = 1.0 - p
        better = p > best
        labels[better] = k
        best = np.where(better, p, best)
    return labels
