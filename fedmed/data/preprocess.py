"""Deterministic per-case preprocessing: a MONAI ``Compose`` that yields the array contract.

Input: one single-channel image ``(1, X, Y, Z)`` per modality with its 4x4 RAS affine, and
optionally a label map ``(1, X, Y, Z)``. Output: a :class:`PreprocessedCase` with the image
``(C, X', Y', Z')`` float32 (C = the federation's modalities), the label ``(1, X', Y', Z')``
uint8 and the affine of the final grid. Stages, each a small dictionary transform on
MONAI ``MetaTensor`` values (keys ``image``, ``label``, ``foreground``):

1. gather (:func:`gather_case`): each modality onto the first available modality's grid
   through world coordinates (:func:`fedmed.data.geometry.resample_onto`); a modality the
   case lacks becomes a zero channel with ``available[c] = False``;
2. ``Orientationd`` to RAS and ``Spacingd`` to the target spacing (bilinear for images,
   nearest for the label);
3. :class:`ForegroundMasksd`: per MR channel, its nonzero voxels when the scan is masked
   (skull-stripped), else the voxels above its Otsu threshold (scanner noise and offsets
   make "nonzero" useless there); per CT channel, voxels above the window's floor; then
   only the largest connected component of the channels' union;
4. ``CropForegroundd``: crop to the foreground's bounding box plus a margin;
5. :class:`NormalizeIntensitiesd`: z-score over the channel's foreground for MR,
   clip-and-scale to [0, 1] for a CT window (``ScaleIntensityRange``), or nothing;
6. ``SpatialPadd`` to at least the patch size.

The affine of the final grid travels with the case, so a prediction can be put back on any
original grid with :func:`fedmed.data.geometry.resample_label_to`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.formats import Case
from fedmed.data.geometry import resample_onto, same_grid, to_meta_tensor
from fedmed.data.io import Image, read_image
from fedmed.data.planning import ModalityNormalization, PreprocessSettings
from fedmed.errors import PreprocessingError

PIPELINE_VERSION = 6
"""Bumped whenever the pipeline's output changes: part of every cache key."""
MASKED_ZERO_FRACTION = 0.01
"""An MR channel with at least this fraction of exact zeros is taken as masked."""
FOREGROUND_MARGIN = 2
"""Voxels kept around the foreground's bounding box."""
OTSU_SAMPLE = 500_000
"""Voxels (evenly strided) an Otsu threshold is computed from: enough for 256 bins."""
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """A case after preprocessing, ready for patch sampling or sliding-window inference.

    Attributes:
        case_id: the case's id in its site.
        image: ``(C, X, Y, Z)`` float32 (possibly a read-only memory map), C = the
            federation's modalities in order.
        label: ``(1, X, Y, Z)`` uint8, or ``None`` for an unlabelled case.
        available: ``(C,)`` bool; ``False`` where the case lacks the modality (zero channel).
        affine: ``(4, 4)`` voxel-to-RAS matrix of the preprocessed grid.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    available: np.ndarray
    affine: np.ndarray

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``."""
        x, y, z = self.image.shape[1:]
        return int(x), int(y), int(z)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each array axis."""
        s = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])


# --------------------------------------------------------------------------- foreground


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of some intensities (SimpleITK's ``OtsuThresholdImageFilter``).

    Args:
        values: any shape; flattened.
        bins: histogram bins.

    Returns:
        The cut that maximises the between-class variance, at the centre of its bin. ITK
        spans its histogram a hair wider than ``numpy.histogram``, so the cut sits within
        about 0.5 % of a bin of a NumPy Otsu's (pipeline version 6 onwards).
    """
    import SimpleITK as sitk

    # ITK has no 1D images: a 1 x N 2D image holds the same histogram.
    flat = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(1, -1))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(bins)
    otsu.SetReturnBinMidpoint(True)
    otsu.Execute(sitk.GetImageFromArray(flat))
    return float(otsu.GetThreshold())


def foreground_masks(
    image: Any, available: np.ndarray, masked: np.ndarray, norms: Sequence[ModalityNormalization]
) -> Any:
    """Per-channel foreground ``(C, X, Y, Z)`` bool of an image ``(C, X, Y, Z)`` tensor.

    MR: in a masked (skull-stripped) scan, where at least 1% of voxels are exactly zero, the
    nonzero voxels; otherwise above the channel's Otsu threshold (scanners differ in noise
    floor and offset, so no fixed fraction of the maximum works for all); CT: above the
    window's floor; other channels: nonzero; unavailable channels: empty.
    """
    import torch

    masks = torch.zeros(image.shape, dtype=torch.bool)
    for c, norm in enumerate(norms):
        if not available[c]:
            continue
        ch = image[c]
        if norm.kind == "zscore":
            nonzero = ch != 0
            if not bool(nonzero.any()):
                continue
            if masked[c]:
                masks[c] = nonzero  # masked / skull-stripped: zero is the background
            else:
                flat = ch.reshape(-1)
                sample = flat[:: max(1, flat.numel() // OTSU_SAMPLE)].float().numpy()
                masks[c] = ch > otsu_threshold(sample)
        elif norm.kind == "ct_window" and norm.window is not None:
            masks[c] = ch > norm.window[0]
        else:
            masks[c] = ch != 0
    return masks


class ForegroundMasksd:
    """Adds ``foreground`` ``(C, X, Y, Z)`` bool: each channel's foreground, as one mask.

    Each channel's mask (:func:`foreground_masks`) is kept only within the largest
    26-connected component of the channels' union, which drops isolated noise voxels.
    Reads ``image`` ``(C, X, Y, Z)``, ``available`` ``(C,)`` and ``masked`` ``(C,)``.

    Raises:
        PreprocessingError: the foreground is empty (every voxel of every modality is zero).
    """

    def __init__(self, norms: Sequence[ModalityNormalization], case_id: str = "") -> None:
        self.norms = tuple(norms)
        self.case_id = case_id

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` with ``foreground`` added."""
        from monai.transforms.utils import get_largest_connected_component_mask

        d = dict(data)
        # From the raw (resampled) intensities: MR scans carry noise in the background, so
        # "nonzero" would keep the whole field of view; a CT window can map tissue to 0
        # after scaling, so it is judged before normalisation.
        fg = foreground_masks(d["image"].as_tensor(), d["available"], d["masked"], self.norms)
        union = get_largest_connected_component_mask(fg.any(0))  # 26-connected
        if not bool(union.any()):
            raise PreprocessingError(
                f"case {self.case_id!r}: every voxel of every modality is zero after "
                "resampling; the images are empty or do not overlap (check them with "
                "`fedmed data check`)"
            )
        d["foreground"] = fg & union[None]
        return d


# --------------------------------------------------------------------------- normalisation


def zscore(channel: Any, mask: Any) -> Any:
    """``(x - mean) / std`` of a ``(1, X, Y, Z)`` tensor, over its foreground ``mask``.

    MONAI's ``NormalizeIntensity(nonzero=True)`` takes its statistics over the nonzero
    voxels, which in an unmasked scan include the background noise; here they come from
    the Otsu/CT foreground. Voxels that are exactly zero (a masked scan's background,
    padding from resampling) stay zero, as with ``nonzero=True``.
    """
    import torch

    values = channel[mask] if bool(mask.any()) else channel.reshape(-1)
    mean, std = values.mean(), values.std()
    if not bool(std > 1e-6):  # a constant foreground: centre it, nothing to scale
        std = torch.ones(())
    return torch.where(channel != 0, (channel - mean) / std, torch.zeros(()))


class NormalizeIntensitiesd:
    """Normalises ``image`` ``(C, X, Y, Z)`` channel by channel, as the settings say.

    z-score over the channel's ``foreground`` (MR), clip-and-scale of a CT window to [0, 1]
    (``ScaleIntensityRange``), or nothing; unavailable channels are left as they are.
    """

    def __init__(self, norms: Sequence[ModalityNormalization]) -> None:
        self.norms = tuple(norms)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` with ``image`` normalised (same grid, same shape)."""
        import torch
        from monai.transforms import ScaleIntensityRange

        d = dict(data)
        image, fg, available = d["image"], d["foreground"], d["available"]
        grid_affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
        plain = image.as_tensor()
        out = []
        for c, norm in enumerate(self.norms):
            ch = plain[c : c + 1]
            if available[c] and norm.kind == "zscore":
                ch = zscore(ch, fg[c : c + 1])
            elif available[c] and norm.kind == "ct_window" and norm.window is not None:
                lo, hi = norm.window
                ch = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(ch)
            out.append(torch.as_tensor(ch, dtype=torch.float32))
        d["image"] = to_meta_tensor(torch.cat(out).numpy(), grid_affine)
        return d


# --------------------------------------------------------------------------- pipeline


def build_pipeline(settings: PreprocessSettings, has_label: bool, case_id: str = "") -> Any:
    """The MONAI ``Compose`` of stages 2-6 for one case (``image`` and maybe ``label``).

    Args:
        settings: the pipeline settings.
        has_label: whether the dictionaries carry a ``label``.
        case_id: named in error messages.
    """
    from monai.transforms import Compose, CropForegroundd, Orientationd, Spacingd, SpatialPadd

    keys = ["image", "label"] if has_label else ["image"]
    steps: list[Any] = [
        # Explicit labels: RAS world axes (silences a MONAI default-change warning).
        Orientationd(keys=keys, axcodes=settings.orientation, labels=_RAS_LABELS),
        Spacingd(
            keys=keys,
            pixdim=settings.target_spacing,
            mode=["bilinear", "nearest"][: len(keys)],
            padding_mode=["zeros"] * len(keys),
            dtype=np.float32,
        ),
        ForegroundMasksd(settings.normalization, case_id),
    ]
    if settings.crop_foreground:
        steps.append(
            CropForegroundd(
                keys=[*keys, "foreground"],
                source_key="foreground",
                margin=FOREGROUND_MARGIN,
                allow_smaller=True,  # the box stops at the image's edges; nothing is padded
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    steps += [
        NormalizeIntensitiesd(settings.normalization),
        SpatialPadd(keys=keys, spatial_size=settings.patch_size, mode="constant"),
    ]
    return Compose(steps)


def _single_channel(name: str, img: Image, case_id: str) -> np.ndarray:
    """The ``(1, X, Y, Z)`` array of a one-channel image; NaN/inf refused, not replaced."""
    if img.array.ndim != 4 or img.array.shape[0] != 1:
        raise PreprocessingError(
            f"case {case_id!r}: modality {name!r} ({img.source}) has shape {img.array.shape}; "
            "expected one 3D volume (1, X, Y, Z) per modality"
        )
    bad = int(img.array.size - np.count_nonzero(np.isfinite(img.array)))
    if bad:
        raise PreprocessingError(
            f"case {case_id!r}: {name} ({img.source}) has {bad} NaN or infinite voxel(s); "
            "expected finite values: re-export the image (fedmed does not guess values)"
        )
    return img.array


def _present_modalities(
    images: Mapping[str, Image], settings: PreprocessSettings, case_id: str
) -> list[str]:
    """The settings' modalities that ``images`` has, in channel order."""
    unknown = [m for m in images if m not in settings.modalities]
    if unknown:
        raise PreprocessingError(
            f"case {case_id!r}: modalities {unknown} are not in the federation's "
            f"{list(settings.modalities)}; rename the files or fix the config's modalities"
        )
    present = [m for m in settings.modalities if m in images]
    if not present:
        raise PreprocessingError(
            f"case {case_id!r}: none of the federation's modalities {list(settings.modalities)} "
            "is present; the case has no image to preprocess"
        )
    return present


def _label_on_grid(
    label: Image, affine: np.ndarray, shape: tuple[int, int, int], case_id: str
) -> np.ndarray:
    """The label ``(1, X, Y, Z)`` float32 on the reference grid (nearest neighbour)."""
    lab = _single_channel("label", label, case_id)
    if not np.array_equal(lab, np.rint(lab)):  # refused, not rounded: an interpolated map
        raise PreprocessingError(
            f"case {case_id!r}: label {label.source} has non-integer values, e.g. "
            f"{np.unique(lab[lab != np.rint(lab)])[:3].tolist()}; expected integer labels "
            "(resample labels with nearest neighbour, never interpolate them)"
        )
    if lab.min(initial=0) < 0 or lab.max(initial=0) > 255:
        raise PreprocessingError(
            f"case {case_id!r}: label {label.source} has values outside 0..255 "
            f"({lab.min()}..{lab.max()}); labels must be small non-negative integers"
        )
    if not same_grid(label, affine, shape):
        lab = resample_onto(lab, label.affine, affine, shape, "nearest")
    return lab.astype(np.float32)


def gather_case(
    images: Mapping[str, Image],
    settings: PreprocessSettings,
    label: Image | None = None,
    case_id: str = "",
) -> dict[str, Any]:
    """Stage 1: the case's modalities as one ``(C, X, Y, Z)`` image on one grid.

    Args:
        images: modality -> ``(1, X, Y, Z)`` image; any subset of ``settings.modalities``.
        settings: the pipeline settings (channel order).
        label: the label ``(1, X, Y, Z)``, on any grid that overlaps the images.
        case_id: named in error messages.

    Returns:
        ``image`` (``MetaTensor`` ``(C, X, Y, Z)`` float32 on the first present modality's
        grid), ``label`` (``(1, X, Y, Z)``, when given), ``available`` and ``masked``
        (``(C,)`` bool: the channel has a scan; the scan is masked, i.e. at least
        :data:`MASKED_ZERO_FRACTION` of its voxels are exactly zero).
    """
    present = _present_modalities(images, settings, case_id)
    ref = images[present[0]]
    ref_affine, ref_shape = ref.affine, ref.spatial_shape
    channels: list[np.ndarray] = []
    available = np.zeros(len(settings.modalities), dtype=bool)
    masked = np.zeros(len(settings.modalities), dtype=bool)
    for c, m in enumerate(settings.modalities):
        if m not in images:
            channels.append(np.zeros(ref_shape, dtype=np.float32))
            continue
        arr = _single_channel(m, images[m], case_id)
        if not same_grid(images[m], ref_affine, ref_shape):
            # Modalities in separate files may be on slightly different grids.
            arr = resample_onto(arr, images[m].affine, ref_affine, ref_shape, "bilinear")
        channels.append(arr[0])
        available[c] = True
        masked[c] = float((arr == 0).mean()) >= MASKED_ZERO_FRACTION
    data: dict[str, Any] = {
        "image": to_meta_tensor(np.stack(channels).astype(np.float32), ref_affine),
        "available": available,
        "masked": masked,
    }
    if label is not None:
        lab = _label_on_grid(label, ref_affine, ref_shape, case_id)
        data["label"] = to_meta_tensor(lab, ref_affine)
    return data


def _run(pipeline: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Apply ``pipeline``, re-raising our own errors as themselves.

    MONAI wraps whatever a transform raises in ``RuntimeError("applying transform ...")``;
    a :class:`PreprocessingError` (e.g. an empty foreground) must reach the user unwrapped.
    """
    try:
        return pipeline(data)
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, PreprocessingError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def preprocess_images(
    images: Mapping[str, Image],
    settings: PreprocessSettings,
    label: Image | None = None,
    *,
    case_id: str = "",
) -> PreprocessedCase:
    """Run the deterministic pipeline on images already in memory (what ``predict`` uses).

    Args:
        images: modality -> single-channel image ``(1, X, Y, Z)`` with its RAS affine; any
            subset of ``settings.modalities`` (absent ones become zero channels).
        settings: the pipeline settings.
        label: the label map ``(1, X, Y, Z)``, on any grid that overlaps the images.
        case_id: carried into the result and into error messages.

    Returns:
        The :class:`PreprocessedCase`: image ``(C, X, Y, Z)`` float32 with
        ``C = len(settings.modalities)``, label ``(1, X, Y, Z)`` uint8 or ``None``.

    Raises:
        PreprocessingError: no known modality given, unknown modality names, a
            multi-channel image, labels outside 0..255, or an all-zero image.
    """
    data = gather_case(images, settings, label, case_id)
    data = _run(build_pipeline(settings, label is not None, case_id), data)
    image, available = data["image"], data["available"]
    out_label = None
    if label is not None:
        out_label = np.asarray(data["label"].detach().cpu().numpy()).round().astype(np.uint8)
    out_image = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
    out_image[~available] = 0.0
    return PreprocessedCase(
        case_id=case_id,
        image=out_image,
        label=out_label,
        available=available,
        affine=np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64),
    )


# --------------------------------------------------------------------------- reading a case


def _select_channel(img: Image, channel: int | None, path: Path, case_id: str) -> Image:
    """Channel ``channel`` of a 4D file as a ``(1, X, Y, Z)`` image (``None``: a 3D file)."""
    if channel is None:
        if img.array.shape[0] != 1:
            raise PreprocessingError(
                f"case {case_id!r}: {path} holds {img.array.shape[0]} channels but the manifest "
                "names no channel; give one 3D file per modality"
            )
        return img
    if channel >= img.array.shape[0]:
        raise PreprocessingError(
            f"case {case_id!r}: {path} has {img.array.shape[0]} channels, the manifest asks "
            f"for channel {channel}; fix the dataset.json modality list"
        )
    return Image(img.array[channel : channel + 1], img.affine, img.source, img.header)


def label_path(case: Case) -> Path | None:
    """The case's label file, or ``None`` when it has none on disk."""
    # The folder layout names label.nii.gz even when it is absent: treat as unlabelled.
    return case.label if case.label is not None and case.label.exists() else None


def read_case_images(case: Case, settings: PreprocessSettings) -> dict[str, Image]:
    """Read the images of a case, each distinct file once (4D files are shared by channels).

    Returns:
        modality -> ``(1, X, Y, Z)`` image, for the settings' modalities the case has.

    Raises:
        ImageReadError: a file cannot be read.
        PreprocessingError: a channel index does not exist in its file.
    """
    by_path: dict[Path, Image] = {}
    out: dict[str, Image] = {}
    for m in settings.modalities:
        mf = case.images.get(m)
        if mf is None:
            continue
        if mf.path not in by_path:
            by_path[mf.path] = read_image(mf.path, max_megavoxels=settings.max_megavoxels)
        out[m] = _select_channel(by_path[mf.path], mf.channel, mf.path, case.case_id)
    return out


def preprocess_case(case: Case, settings: PreprocessSettings) -> PreprocessedCase:
    """Read a case's files and run :func:`preprocess_images` on them.

    A label path that does not exist gives an unlabelled case (``label = None``).

    Raises:
        ImageReadError: a file cannot be read.
        PreprocessingError: see :func:`preprocess_images`.
    """
    images = read_case_images(case, settings)
    lp = label_path(case)
    label = read_image(lp, max_megavoxels=settings.max_megavoxels) if lp is not None else None
    return preprocess_images(images, settings, label, case_id=case.case_id)
