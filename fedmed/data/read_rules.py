"""The rules every image read obeys: limits checked on the header, then on the voxels.

:func:`fedmed.data.io.read_image` applies them to every format (nibabel, SimpleITK, DICOM
series) in the same order: the header's claimed grid first (:func:`check_header`: 3D or
4D channels last, no empty axis, at most :data:`MAX_CHANNELS` channels and the caller's
megavoxel limit, a usable affine), so a file that claims a huge volume allocates nothing;
then the voxels (:func:`channels_first`: real scalar values; :func:`check_finite`: no NaN
or infinity). A refused file raises :class:`~fedmed.errors.ImageReadError` whose ``kind``
is one of :data:`ReadFailure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from fedmed.errors import ImageReadError

DEFAULT_MAX_MEGAVOXELS = 64.0
"""Default size limit of :func:`fedmed.data.io.read_image`, in millions of voxels per
channel: the config's ``preprocessing.max_case_megavoxels`` and the site policy's
``data.max_image_megavoxels`` default to the same value."""
MAX_CHANNELS = 16
"""Most channels (modalities) one file may claim; more is a malformed or non-scan file."""
_MIN_SPACING_MM = 1e-6
"""A voxel axis shorter than this (mm) makes the affine singular."""
_MIN_ORTHOGONALITY = 1e-3
"""Smallest ``|det|`` of the affine's unit-length axes: below it the axes are (nearly)
parallel and the grid has no volume."""

ReadFailure = Literal[
    "missing", "unsupported", "not_an_image", "corrupt", "not_3d", "too_large",
    "non_finite", "bad_affine",
]
"""Why :func:`fedmed.data.io.read_image` refused a file (:attr:`ImageReadError.kind`)."""


# -- rules on the header (before the voxels are read) ------------------------------------


def check_header(
    p: Path,
    spatial: tuple[int, ...],
    channels: int,
    affine: np.ndarray,
    max_megavoxels: float,
) -> None:
    """Refuse an empty, oversized or many-channel grid, or an unusable affine.

    Args:
        p: the file (named in the message).
        spatial: ``(X, Y, Z)`` as the header claims it.
        channels: channels the header claims.
        affine: the header's voxel-to-RAS affine.
        max_megavoxels: the limit per channel.
    """
    shown = " x ".join(str(s) for s in spatial)
    if min(spatial) < 1:
        raise ImageReadError(
            f"{p}: the header claims an empty volume ({shown} voxels); expected at least one "
            "voxel along each axis: the file is damaged, re-export it",
            "corrupt",
        )
    if channels > MAX_CHANNELS:
        raise ImageReadError(
            f"{p}: the header claims {channels} channels; fedmed reads at most {MAX_CHANNELS} "
            "(one per modality) and refused it before reading the voxels; store one 3D "
            "volume per modality",
            "too_large",
        )
    megavoxels = float(np.prod(np.asarray(spatial, dtype=np.float64))) / 1e6
    if megavoxels > max_megavoxels:
        raise ImageReadError(
            f"{p}: the header claims {megavoxels:.1f} megavoxels per channel ({shown}), more "
            f"than the limit of {max_megavoxels:g}; refused before reading the voxels. Crop "
            "or downsample the image, or raise the limit (preprocessing.max_case_megavoxels; "
            "at a federated site the policy's data.max_image_megavoxels; "
            "`fedmed data check --max-megavoxels`)",
            "too_large",
        )
    check_affine(p, affine)


def check_affine(p: Path, affine: np.ndarray) -> None:
    """Refuse a non-finite affine, a zero voxel size or (nearly) parallel axes."""
    why = None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in np.asarray(affine))
        why = f"it holds NaN or infinite entries: {rows}"
    else:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        axis = int(np.argmin(spacing))
        if spacing[axis] < _MIN_SPACING_MM:
            why = f"the voxel size along array axis {axis} is {spacing[axis]:g} mm"
        elif abs(np.linalg.det(affine[:3, :3] / spacing)) < _MIN_ORTHOGONALITY:
            why = "its axes are (nearly) parallel, so the voxel grid has no volume"
    if why is not None:
        raise ImageReadError(
            f"{p}: the voxel-to-world affine is singular or invalid ({why}); expected finite "
            "numbers, positive voxel sizes and three independent axes. Fix the header's "
            "qform/sform (NIfTI) or spacing/direction, or re-export the image",
            "bad_affine",
        )


def nifti_layout(p: Path, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """``((X, Y, Z), channels)`` of a NIfTI shape: 3D, 4D channels last, or 5D vector."""
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4:
        return shape[:3], shape[3]
    if len(shape) == 5 and shape[3] == 1:  # NIfTI vector images store (X, Y, Z, 1, C)
        return shape[:3], shape[4]
    raise ImageReadError(
        f"{p}: expected a 3D image (or 4D with channels last), got shape {shape}; "
        "convert it to one 3D volume per modality",
        "not_3d",
    )


# -- rules on the voxels -----------------------------------------------------------------


def channels_first(data: np.ndarray, p: Path) -> np.ndarray:
    """``(C, X, Y, Z)`` float32 from a 3D, 4D channels-last or 5D vector array."""
    if data.dtype.kind not in "biuf":
        raise ImageReadError(
            f"{p}: voxel type {data.dtype} is not a real scalar intensity (complex or RGB "
            "data); convert it to one real-valued 3D volume per channel",
            "not_an_image",
        )
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:
        data = np.moveaxis(data[:, :, :, 0, :], -1, 0)
    else:
        raise ImageReadError(
            f"{p}: expected a 3D image (or 4D with channels last), got shape {data.shape}; "
            "convert it to one 3D volume per modality",
            "not_3d",
        )
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: check_finite
        return np.ascontiguousarray(data, dtype=np.float32)


def check_finite(p: Path, array: np.ndarray) -> None:
    """Refuse NaN or infinite voxels in the ``(C, X, Y, Z)`` float32 array.

    Checked after the conversion to float32: a float64 value beyond float32's range has
    become infinite there.
    """
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if count:
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))
        raise ImageReadError(
            f"{p}: {count} of {array.size} voxels are NaN or infinite (the first at channel "
            f"{first[0]}, voxel {first[1:]}); expected finite intensities. Re-export the "
            "image (a failed conversion or a division by zero); fedmed does not guess "
            "values for them",
            "non_finite",
        )
