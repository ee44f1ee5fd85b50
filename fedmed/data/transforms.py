"""Training-time patch sampling and augmentation (MONAI, seeded explicitly).

Patch centres are drawn with MONAI's own class-balanced sampler
(:func:`monai.transforms.utils.generate_label_classes_crop_centers`, the core of
``RandCropByLabelClassesd``) on per-class voxel indices computed once per case, and the
patch is sliced straight out of the (memory-mapped) preprocessed volume, so a training step
never copies a whole case. Augmentation is a MONAI ``Compose`` of dictionary transforms on
the ``(C, P, P, P)`` patch: flips, a small rotation + scaling (``RandAffined``, nearest for
the label, applied to a fraction of patches because it is the costly step), intensity
scale/shift, Gaussian noise and gamma (``RandAdjustContrastd``). Channels of unavailable
modalities are zeroed again afterwards, so augmentation never makes them nonzero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MAX_INDICES_PER_CLASS = 20000
"""Per-class voxel indices kept per case (evenly subsampled): bounds memory on big cases."""

BACKGROUND_RATIO = 0.5
"""Weight of background as a patch centre, relative to each foreground class (weight 1)."""

ROTATION_RADIANS = math.radians(10.0)
SCALE_RANGE = 0.1
AFFINE_PROB = 0.3
"""Fraction of patches that get the rotation + scaling (the expensive interpolation)."""


def class_indices(label: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Flat voxel indices of each class ``0..num_classes-1`` in a ``(1, X, Y, Z)`` label.

    Large classes are subsampled evenly to :data:`MAX_INDICES_PER_CLASS` indices.
    """
    from monai.transforms.utils import map_classes_to_indices

    lab = np.asarray(label)
    idx = map_classes_to_indices(
        lab, num_classes=num_classes, max_samples_per_class=MAX_INDICES_PER_CLASS
    )
    return [np.asarray(i, dtype=np.int64) for i in idx]


def class_ratios(num_classes: int, class_balance: bool) -> list[float]:
    """Centre-sampling weights: background, then one per foreground class.

    With ``class_balance`` every foreground class gets the same weight (so a tiny lesion
    class is sampled as often as white matter) and background :data:`BACKGROUND_RATIO`.
    Without it a centre is drawn uniformly over the voxels (see :func:`sample_center`).
    """
    if not class_balance:
        return []
    return [BACKGROUND_RATIO] + [1.0] * (num_classes - 1)


def sample_center(
    shape: Sequence[int],
    patch_size: Sequence[int],
    indices: Sequence[np.ndarray] | None,
    ratios: list[float],
    rng: np.random.RandomState,
) -> tuple[int, int, int]:
    """A patch centre inside ``shape`` such that the patch fits (when the volume allows).

    Args:
        shape: ``(X, Y, Z)`` of the case.
        patch_size: ``(P, P, P)``.
        indices: per-class flat indices (:func:`class_indices`); ``None`` or empty ratios:
            uniform over the valid centres.
        ratios: per-class weights (:func:`class_ratios`).
        rng: the random state (seeded by the caller).
    """
    from monai.transforms.utils import generate_label_classes_crop_centers

    if indices is not None and ratios and any(
        len(i) and r > 0 for i, r in zip(indices, ratios, strict=True)
    ):
        centers = generate_label_classes_crop_centers(
            spatial_size=list(patch_size),
            num_samples=1,
            label_spatial_shape=list(shape),
            indices=indices,
            ratios=list(ratios),
            rand_state=rng,
            allow_smaller=True,
            warn=False,
        )
        return tuple(int(c) for c in centers[0])  # type: ignore[return-value]
    out = []
    for s, p in zip(shape, patch_size, strict=True):
        lo, hi = p // 2, s - (p - p // 2)
        out.append(int(rng.randint(lo, hi + 1)) if hi >= lo else s // 2)
    return tuple(out)  # type: ignore[return-value]


def center_of(shape: Sequence[int]) -> tuple[int, int, int]:
    """The centre voxel of a grid (the eval-mode patch centre)."""
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def crop_patch(array: np.ndarray, center: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """The ``(C, P, P, P)`` patch of a ``(C, X, Y, Z)`` array around ``center``, zero-padded.

    Slices only the patch (cheap on a memory map) into a new writable array; axes shorter
    than the patch are padded with zeros evenly on both sides.
    """
    slices, pads = [slice(None)], [(0, 0)]
    for c, s, p in zip(center, array.shape[1:], patch_size, strict=True):
        start = int(c) - p // 2
        start = min(max(start, 0), max(s - p, 0))
        stop = min(start + p, s)
        slices.append(slice(start, stop))
        missing = p - (stop - start)
        pads.append((missing // 2, missing - missing // 2))
    # Always a writable copy: the source may be a read-only memory map of the cache.
    patch = np.array(array[tuple(slices)], copy=True, order="C")
    if any(a or b for a, b in pads):
        patch = np.pad(patch, pads, mode="constant")
    return patch


def build_augmentation(patch_size: Sequence[int]) -> Any:
    """The MONAI ``Compose`` of random dictionary transforms on ``{"image", "label"}`` patches.

    Image ``(C, P, P, P)`` float32, label ``(1, P, P, P)`` float; seed it with
    ``set_random_state`` before each call for reproducible draws.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    return Compose(
        [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandAffined(
                keys=keys,
                prob=AFFINE_PROB,
                rotate_range=(ROTATION_RADIANS,) * 3,
                scale_range=(SCALE_RANGE,) * 3,
                mode=("bilinear", "nearest"),
                padding_mode=("zeros", "zeros"),
                spatial_size=list(patch_size),
                cache_grid=True,
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.15, mean=0.0, std=0.1),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
        ]
    )


def augment(
    aug: Any,
    image: np.ndarray,
    label: np.ndarray,
    available: np.ndarray,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``aug`` (from :func:`build_augmentation`) reproducibly to one patch.

    Args:
        aug: the ``Compose``.
        image: ``(C, P, P, P)`` float32.
        label: ``(1, P, P, P)`` integer.
        available: ``(C,)`` bool; unavailable channels are zero on return.
        seed: seeds every random transform of ``aug``.

    Returns:
        ``(image (C, P, P, P) float32, label (1, P, P, P) int64)`` tensors.
    """
    aug.set_random_state(seed=int(seed) % (2**32))
    lab_f = torch.from_numpy(np.asarray(label, dtype=np.float32))
    out = aug({"image": torch.from_numpy(image), "label": lab_f})
    img = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().contiguous()
    lab = torch.as_tensor(out["label"]).as_subclass(torch.Tensor).round().long().contiguous()
    off = torch.from_numpy(~np.asarray(available, dtype=bool))
    if bool(off.any()):
        img[off] = 0.0
    return img, lab
