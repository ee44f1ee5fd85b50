"""Deterministic preprocessing (MONAI transforms) and its on-disk cache.

Pipeline, per case (every step a MONAI transform on :class:`monai.data.MetaTensor`):

1. each modality file is read once; modalities on slightly different grids are resampled
   onto the first available modality's grid through world coordinates (``SpatialResample``);
   a modality the case lacks becomes a zero channel with ``available[c] = False``;
2. reorientation to RAS (``Orientation``) and resampling to the target spacing (``Spacing``;
   bilinear for images, nearest for the label);
3. the foreground: per MR channel, its nonzero voxels when the scan is masked (skull-
   stripped), else the voxels above its Otsu threshold (scanner noise and offsets make
   "nonzero" useless there); per CT channel, voxels above the window's floor;
4. crop to the bounding box of the largest connected component of the union of the
   channels' foregrounds, plus a margin
   (``SpatialCrop`` on the box of ``generate_spatial_bounding_box``);
5. per-modality intensity normalisation: z-score with mean and std over the channel's
   foreground for MR, clip-and-scale to [0, 1] for a CT window (``ScaleIntensityRange``),
   or nothing; then pad to at least the patch size (``SpatialPad``).

The affine of the final grid travels with the case, so a prediction can be put back on any
original grid with :func:`resample_label_to`.

:class:`CaseCache` stores one folder per case under ``cache_dir / settings.key()``: the
arrays as ``.npy`` (memory-mapped on load, so later epochs and rounds never re-read NIfTI)
and a small ``meta.json``. Entries are written to a temporary folder and renamed into
place, so a killed process never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.data.check import plan_target_spacing  # re-exported: the coordinator's planner
from fedmed.data.formats import Case, SiteManifest
from fedmed.data.io import Image, read_image
from fedmed.errors import ConfigError, ImageReadError, PreprocessingError

if TYPE_CHECKING:
    from fedmed.config import FederationConfig

PIPELINE_VERSION = 5  # bump when the pipeline code changes what it writes
"""Bumped whenever the pipeline's output changes: part of every cache key."""

FINGERPRINT_FILE = "fingerprint.json"
DEFAULT_CACHE_NAME = ".fedmed-cache"
# Two grids closer than this (affine entries, mm) are the same grid: no resampling.
_SAME_GRID_ATOL = 1e-3
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ModalityNormalization:
    """How one modality's intensities are normalised (resolved from the config)."""

    kind: str = "zscore"
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that determines the preprocessed output (and so the cache key).

    Attributes:
        modalities: the federation's modalities, in channel order.
        target_spacing: voxel size (mm) after resampling.
        orientation: axis codes of the output (``"RAS"``).
        normalization: one entry per modality, in ``modalities`` order.
        crop_foreground: crop to the nonzero bounding box.
        patch_size: the output is padded to at least this.
        cache_dir: default cache folder from the config (``None``: ``<site>/.fedmed-cache``);
            not part of the key.
    """

    modalities: tuple[str, ...]
    target_spacing: tuple[float, float, float]
    orientation: str = "RAS"
    normalization: tuple[ModalityNormalization, ...] = ()
    crop_foreground: bool = True
    patch_size: tuple[int, int, int] = (64, 64, 64)
    cache_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.normalization:
            object.__setattr__(
                self, "normalization", tuple(ModalityNormalization() for _ in self.modalities)
            )
        if len(self.normalization) != len(self.modalities):
            raise ConfigError(
                f"preprocessing: {len(self.normalization)} normalisation entries for "
                f"{len(self.modalities)} modalities {list(self.modalities)}"
            )
        if len(self.target_spacing) != 3 or any(s <= 0 for s in self.target_spacing):
            raise ConfigError(
                f"preprocessing.target_spacing must be three positive numbers (mm), "
                f"got {self.target_spacing}"
            )

    @classmethod
    def from_config(
        cls, cfg: FederationConfig, target_spacing: Sequence[float] | None = None
    ) -> PreprocessSettings:
        """Settings of a federation.

        Args:
            cfg: the federation config.
            target_spacing: overrides ``cfg.preprocessing.target_spacing`` (e.g. planned
                from fingerprints by :func:`plan_target_spacing`).

        Raises:
            ConfigError: neither ``target_spacing`` nor the config gives a spacing.
        """
        pre = cfg.preprocessing
        spacing = target_spacing if target_spacing is not None else pre.target_spacing
        if spacing is None:
            raise ConfigError(
                "preprocessing.target_spacing is not set in the federation config and no "
                "spacing was planned: run `fedmed data check` on each site (it writes "
                f"{FINGERPRINT_FILE}, from which the spacing is planned) or set "
                "preprocessing.target_spacing: [sx, sy, sz] (mm)"
            )
        norms = []
        for m in cfg.modalities:
            n = pre.normalization.get(m)
            norms.append(
                ModalityNormalization()
                if n is None
                else ModalityNormalization(
                    n.kind, None if n.window is None else (float(n.window[0]), float(n.window[1]))
                )
            )
        return cls(
            modalities=tuple(cfg.modalities),
            target_spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            orientation=pre.orientation,
            normalization=tuple(norms),
            crop_foreground=pre.crop_foreground,
            patch_size=tuple(int(p) for p in pre.patch_size),  # type: ignore[arg-type]
            cache_dir=None if pre.cache_dir is None else cfg.resolve(pre.cache_dir),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form of the fields that make up the key."""
        return {
            "version": PIPELINE_VERSION,
            "modalities": list(self.modalities),
            "target_spacing": [round(float(s), 6) for s in self.target_spacing],
            "orientation": self.orientation,
            "normalization": [
                {"kind": n.kind, "window": None if n.window is None else list(n.window)}
                for n in self.normalization
            ],
            "crop_foreground": self.crop_foreground,
            "patch_size": list(self.patch_size),
        }

    def key(self) -> str:
        """The part of the cache key that depends on the settings (16 hex digits)."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


# --------------------------------------------------------------------------- pipeline


def _meta(array: np.ndarray, affine: np.ndarray) -> Any:
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.as_tensor(affine))


def _same_grid(a: Image, affine: np.ndarray, shape: tuple[int, int, int]) -> bool:
    return a.spatial_shape == tuple(shape) and np.allclose(a.affine, affine, atol=_SAME_GRID_ATOL)


def _resample_onto(
    array: np.ndarray,
    affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    mode: str,
) -> np.ndarray:
    """``(1, X, Y, Z)`` array on ``affine`` resampled onto another grid via world coordinates."""
    import torch
    from monai.transforms import SpatialResample

    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        _meta(array, affine),
        dst_affine=torch.as_tensor(dst_affine),
        spatial_size=[int(s) for s in dst_shape],
    )
    return np.asarray(out.detach().cpu().numpy(), dtype=np.float32)


def _single_channel(name: str, img: Image, case_id: str) -> np.ndarray:
    if img.array.ndim != 4 or img.array.shape[0] != 1:
        raise PreprocessingError(
            f"case {case_id!r}: modality {name!r} ({img.source}) has shape {img.array.shape}; "
            "expected one 3D volume (1, X, Y, Z) per modality"
        )
    return np.nan_to_num(img.array, copy=False)


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
        The :class:`PreprocessedCase` (``C = len(settings.modalities)``).

    Raises:
        PreprocessingError: no known modality given, unknown modality names, a
            multi-channel image, labels outside 0..255, or an all-zero image.
    """
    import torch
    from monai.transforms import (
        Orientationd,
        ScaleIntensityRange,
        Spacingd,
        SpatialCrop,
        SpatialPad,
    )
    from monai.transforms.utils import generate_spatial_bounding_box

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
        if not _same_grid(images[m], ref_affine, ref_shape):
            # Modalities in separate files may be on slightly different grids.
            arr = _resample_onto(arr, images[m].affine, ref_affine, ref_shape, "bilinear")
        channels.append(arr[0])
        available[c] = True
        # Judged on the scan as acquired: interpolation blurs a mask's exact zeros away.
        masked[c] = float((arr == 0).mean()) >= MASKED_ZERO_FRACTION
    data: Any = {"image": _meta(np.stack(channels).astype(np.float32), ref_affine)}
    keys = ["image"]
    if label is not None:
        lab = np.rint(_single_channel("label", label, case_id))
        if lab.min(initial=0) < 0 or lab.max(initial=0) > 255:
            raise PreprocessingError(
                f"case {case_id!r}: label {label.source} has values outside 0..255 "
                f"({lab.min()}..{lab.max()}); labels must be small non-negative integers"
            )
        if not _same_grid(label, ref_affine, ref_shape):
            lab = _resample_onto(lab, label.affine, ref_affine, ref_shape, "nearest")
        data["label"] = _meta(lab.astype(np.float32), ref_affine)
        keys.append("label")

    modes = ["bilinear", "nearest"][: len(keys)]
    # Explicit labels: RAS world axes (silences a MONAI default-change warning).
    data = Orientationd(
        keys=keys, axcodes=settings.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))
    )(data)
    data = Spacingd(
        keys=keys,
        pixdim=settings.target_spacing,
        mode=modes,
        padding_mode=["zeros"] * len(keys),
        dtype=np.float32,
    )(data)
    image, lab_t = data["image"], data.get("label")

    # Foreground from the raw (resampled) intensities, per channel: MR scans carry noise
    # in the background, so "nonzero" would keep the whole field of view; a CT window can
    # map tissue to 0 after scaling, so it is judged before normalisation.
    fg_channels = _foreground_masks(image.as_tensor(), available, masked, settings.normalization)
    fg = _largest_component(fg_channels.any(0))
    fg_channels = fg_channels & fg[None]
    if not bool(fg.any()):
        raise PreprocessingError(
            f"case {case_id!r}: every voxel of every modality is zero after resampling; the "
            "images are empty or do not overlap (check them with `fedmed data check`)"
        )
    if settings.crop_foreground:
        start, end = generate_spatial_bounding_box(fg[None], margin=FOREGROUND_MARGIN)
        crop = SpatialCrop(roi_start=start, roi_end=end)
        image = crop(image)
        lab_t = None if lab_t is None else crop(lab_t)
        fg_channels = crop(fg_channels)

    # Normalise on plain tensors; the grid (affine) is the cropped image's.
    grid_affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
    plain = image.as_tensor()
    normalized = []
    for c, norm in enumerate(settings.normalization):
        ch = plain[c : c + 1]
        if available[c] and norm.kind == "zscore":
            ch = _zscore(ch, fg_channels[c : c + 1])
        elif available[c] and norm.kind == "ct_window" and norm.window is not None:
            lo, hi = norm.window
            ch = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(ch)
        normalized.append(torch.as_tensor(ch, dtype=torch.float32))
    image = _meta(torch.cat(normalized).numpy(), grid_affine)

    pad = SpatialPad(spatial_size=settings.patch_size, mode="constant")
    image = pad(image)
    lab_t = None if lab_t is None else pad(lab_t)
    out_label = None
    if lab_t is not None:
        out_label = np.asarray(lab_t.detach().cpu().numpy()).round().astype(np.uint8)
    out_image = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
    out_image[~available] = 0.0
    return PreprocessedCase(
        case_id=case_id,
        image=out_image,
        label=out_label,
        available=available,
        affine=np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64),  # type: ignore[attr-defined]
    )


def resample_label_to(
    label: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map into another grid via world coordinates.

    Works for any pair of grids (oblique, LPS-ordered, anisotropic): each target voxel takes
    the label of the source voxel nearest to the same world point (0 outside the source).

    Args:
        label: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` integer labels on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-RAS matrix of ``label``.
        ref_affine: ``(4, 4)`` voxel-to-RAS matrix of the target grid.
        ref_shape: ``(X, Y, Z)`` of the target grid.

    Returns:
        ``(X, Y, Z)`` labels on the target grid, in ``label``'s integer dtype (uint8 for
        floating input).
    """
    from scipy.ndimage import affine_transform

    lab = np.asarray(label)
    if lab.ndim == 4:
        lab = lab[0]
    if lab.ndim != 3:
        raise PreprocessingError(f"label must be (1, X, Y, Z) or (X, Y, Z), got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab).astype(np.uint8)
    # target voxel -> world -> source voxel, composed into one matrix.
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(ref_affine, np.float64)
    out = affine_transform(
        np.ascontiguousarray(lab),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(int(s) for s in ref_shape),
        order=0,
        mode="constant",
        cval=0,
    )
    return np.asarray(out, dtype=lab.dtype)


def labels_from_probabilities_on(
    probabilities: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
) -> np.ndarray:
    """Argmax on another grid of class probabilities resampled linearly (world coordinates).

    Interpolating probabilities, then taking the argmax on the target grid, keeps thin
    structures that nearest-neighbour resampling of a coarse label map loses. Outside the
    source grid the background (class 0) wins. One class is resampled at a time, keeping a
    running maximum, so memory stays at two target-sized arrays.

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-RAS matrix of ``probabilities``.
        ref_affine: ``(4, 4)`` voxel-to-RAS matrix of the target grid.
        ref_shape: ``(X, Y, Z)`` of the target grid.

    Returns:
        ``(X, Y, Z)`` uint8 labels on the target grid.
    """
    from scipy.ndimage import affine_transform

    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 4:
        raise PreprocessingError(f"probabilities must be (K, X, Y, Z), got {probs.shape}")
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(ref_affine, np.float64)
    shape = tuple(int(s) for s in ref_shape)
    best = np.full(shape, -1.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(probs.shape[0]):
        p = affine_transform(
            np.ascontiguousarray(probs[k]),
            m[:3, :3],
            offset=m[:3, 3],
            output_shape=shape,
            order=1,
            mode="constant",
            cval=1.0 if k == 0 else 0.0,
        )
        better = p > best
        labels[better] = k
        best = np.where(better, p, best)
    return labels


def _select_channel(img: Image, channel: int | None, path: Path, case_id: str) -> Image:
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


def _label_path(case: Case) -> Path | None:
    # The folder layout names label.nii.gz even when it is absent: treat as unlabelled.
    return case.label if case.label is not None and case.label.exists() else None


def read_case_images(case: Case, settings: PreprocessSettings) -> dict[str, Image]:
    """Read the images of a case, each distinct file once (4D files are shared by channels).

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
            by_path[mf.path] = read_image(mf.path)
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
    lp = _label_path(case)
    label = read_image(lp) if lp is not None else None
    return preprocess_images(images, settings, label, case_id=case.case_id)


# --------------------------------------------------------------------------- cache


def _file_stat(path: Path) -> list[Any]:
    """``[absolute path, size, mtime_ns]``; a folder (DICOM series) adds every file's stats."""
    p = path.absolute()
    try:
        st = p.stat()
    except OSError:
        return [str(p), None, None]
    if p.is_dir():
        inner = sorted(
            [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.iterdir() if f.is_file()
        )
        return [str(p), "dir", inner]
    return [str(p), st.st_size, st.st_mtime_ns]


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)[:80] or "case"


class CaseCache:
    """On-disk cache of preprocessed cases, one folder per case.

    Layout: ``cache_dir / settings.key() / <case>-<paths hash>-<source hash>/`` holding
    ``image.npy``, ``label.npy`` (labelled cases) and ``meta.json``. The source hash covers
    each file's absolute path, size and mtime (ns): a changed file or changed settings is a
    miss, and the stale entry of the same case is removed when the new one is stored.

    Attributes:
        root: ``cache_dir / settings.key()``.
        hits: entries served from disk since creation.
        misses: entries computed since creation.
    """

    def __init__(self, cache_dir: str | Path, settings: PreprocessSettings) -> None:
        self.settings = settings
        self.root = Path(cache_dir).absolute() / settings.key()
        self.hits = 0
        self.misses = 0

    def _names(self, case: Case) -> tuple[str, str]:
        paths = [str(mf.path.absolute()) for mf in case.images.values()]
        lp = case.label
        paths.append("" if lp is None else str(lp.absolute()))
        stem = (
            _safe_name(case.case_id)
            + "-"
            + hashlib.sha256(json.dumps(sorted(paths)).encode()).hexdigest()[:8]
        )
        label_path = _label_path(case)
        sources: dict[str, Any] = {
            "case_id": case.case_id,
            "images": {
                m: _file_stat(mf.path) + [mf.channel]
                for m, mf in sorted(case.images.items())
                if m in self.settings.modalities
            },
            "label": None if label_path is None else _file_stat(label_path),
            "settings": self.settings.key(),
        }
        digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
        return stem, f"{stem}-{digest}"

    def entry_path(self, case: Case) -> Path:
        """The folder that holds (or would hold) the case's current entry."""
        return self.root / self._names(case)[1]

    def contains(self, case: Case) -> bool:
        """Whether a valid entry for the case's current files exists."""
        return (self.entry_path(case) / "meta.json").is_file()

    def get(self, case: Case) -> PreprocessedCase:
        """The preprocessed case: memory-mapped from disk, or computed and stored.

        Raises:
            ImageReadError: on a miss, a file cannot be read.
            PreprocessingError: on a miss, the case cannot be preprocessed.
        """
        stem, name = self._names(case)
        entry = self.root / name
        if (entry / "meta.json").is_file():
            try:
                loaded = self._load(entry)
            except (OSError, ValueError, KeyError):
                # A damaged entry (deleted file, disk error) is recomputed.
                shutil.rmtree(entry, ignore_errors=True)
            else:
                self.hits += 1
                return loaded
        pre = preprocess_case(case, self.settings)
        self._store(entry, stem, pre)
        self.misses += 1
        try:
            # Served from the memory map like a hit, so a first pass over a large site does
            # not keep every case in memory.
            return self._load(entry)
        except (OSError, ValueError, KeyError):
            return pre

    def _load(self, entry: Path) -> PreprocessedCase:
        meta = json.loads((entry / "meta.json").read_text())
        image = np.load(entry / "image.npy", mmap_mode="r")
        label = np.load(entry / "label.npy", mmap_mode="r") if meta["has_label"] else None
        if list(image.shape) != meta["shape"]:
            raise ValueError(f"{entry}: image shape {image.shape} != {meta['shape']}")
        return PreprocessedCase(
            case_id=meta["case_id"],
            image=image,
            label=label,
            available=np.asarray(meta["available"], dtype=bool),
            affine=np.asarray(meta["affine"], dtype=np.float64),
        )

    def _store(self, entry: Path, stem: str, pre: PreprocessedCase) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise PreprocessingError(
                f"cannot write the preprocessing cache under {self.root.parent} ({exc}); give "
                "a writable folder with --cache-dir (deployment: the SuperNode's cache-dir) or "
                "preprocessing.cache_dir in the config"
            ) from None
        try:
            np.save(tmp / "image.npy", np.ascontiguousarray(pre.image, dtype=np.float32))
            if pre.label is not None:
                np.save(tmp / "label.npy", np.ascontiguousarray(pre.label, dtype=np.uint8))
            meta = {
                "case_id": pre.case_id,
                "shape": list(pre.image.shape),
                "has_label": pre.label is not None,
                "available": [bool(a) for a in pre.available],
                "affine": np.asarray(pre.affine).tolist(),
                "settings": self.settings.as_dict(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, entry)  # atomic: readers see all of the entry or none of it
            except OSError:
                # Another process stored the same entry first; theirs is as good as ours.
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.root.glob(f"{glob_escape(stem)}-*"):
            if old.name != entry.name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def clean_temporary(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary folders left by killed processes; returns how many."""
        if not self.root.is_dir():
            return 0
        now, n = time.time(), 0
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    n += 1
            except OSError:
                continue
        return n


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def default_cache_dir(
    site_dir: Path, settings: PreprocessSettings, cache_dir: str | Path | None = None
) -> Path:
    """A site's cache folder: ``cache_dir``, else the config's, else ``<site>/.fedmed-cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if settings.cache_dir is not None:
        return settings.cache_dir
    return Path(site_dir) / DEFAULT_CACHE_NAME


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_site` did.

    Attributes:
        site: the site's name.
        cache_dir: the folder holding this settings' entries.
        cases: cases seen.
        hits: served from the cache.
        misses: preprocessed now.
        failed: ``(case_id, message)`` of cases that could not be preprocessed.
        seconds: wall time.
        spacing: output voxel size (mm).
        orientation: output axis codes.
        min_shape: smallest output ``(X, Y, Z)`` per axis.
        max_shape: largest output ``(X, Y, Z)`` per axis.
        missing_channels: modality -> number of cases without it.
        unlabelled: cases without a label file.
    """

    site: str
    cache_dir: Path
    cases: int = 0
    hits: int = 0
    misses: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    orientation: str = "RAS"
    min_shape: tuple[int, int, int] | None = None
    max_shape: tuple[int, int, int] | None = None
    missing_channels: dict[str, int] = field(default_factory=dict)
    unlabelled: int = 0


def preprocess_site(
    manifest: SiteManifest,
    settings: PreprocessSettings,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Fill the cache for every case of a site (cases already cached are hits).

    A case that cannot be read or preprocessed is recorded in ``failed`` and skipped.

    Args:
        manifest: the site's cases (:func:`fedmed.data.formats.load_site`).
        settings: the pipeline settings.
        cache_dir: default :func:`default_cache_dir` of the site.
        progress: show a progress bar.
    """
    t0 = time.perf_counter()
    cache = CaseCache(default_cache_dir(manifest.root, settings, cache_dir), settings)
    cache.clean_temporary()
    summary = PreprocessSummary(
        site=manifest.name,
        cache_dir=cache.root,
        spacing=settings.target_spacing,
        orientation=settings.orientation,
        missing_channels={m: 0 for m in settings.modalities},
    )
    shapes: list[tuple[int, int, int]] = []
    cases: Iterable[Case] = manifest.cases
    if progress:
        from rich.progress import track

        cases = track(manifest.cases, description=f"preprocessing {manifest.name}")
    for case in cases:
        summary.cases += 1
        try:
            pre = cache.get(case)
        except (ImageReadError, PreprocessingError) as exc:
            summary.failed.append((case.case_id, str(exc)))
            continue
        shapes.append(pre.spatial_shape)
        for m, a in zip(settings.modalities, pre.available, strict=True):
            summary.missing_channels[m] += int(not a)
        summary.unlabelled += int(pre.label is None)
    summary.hits, summary.misses = cache.hits, cache.misses
    if shapes:
        arr = np.asarray(shapes)
        summary.min_shape = tuple(int(v) for v in arr.min(0))  # type: ignore[assignment]
        summary.max_shape = tuple(int(v) for v in arr.max(0))  # type: ignore[assignment]
    summary.seconds = time.perf_counter() - t0
    return summary


# --------------------------------------------------------------------------- planning


def load_fingerprints(cfg: FederationConfig) -> list[dict[str, Any]]:
    """The ``fingerprint.json`` of every training site of ``cfg`` (``<site>/fingerprint.json``).

    Raises:
        ConfigError: a site has no fingerprint (the message lists which, and how to make them).
    """
    found, missing = [], []
    for name in cfg.site_names:
        p = cfg.site_dir(name) / FINGERPRINT_FILE
        if not p.is_file():
            missing.append(str(p))
            continue
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{p}: not a valid fingerprint ({exc}); re-run `fedmed data check`"
            ) from None
    if missing:
        raise ConfigError(
            "preprocessing.target_spacing is not set and it cannot be planned: missing "
            f"fingerprints {missing}; run `fedmed data check` on each site or set "
            "preprocessing.target_spacing: [sx, sy, sz] (mm) in the config"
        )
    return found


def settings_for(
    cfg: FederationConfig, target_spacing: Sequence[float] | None = None
) -> PreprocessSettings:
    """Settings of a federation, planning the spacing from fingerprints when unset.

    Order: ``target_spacing``, ``cfg.preprocessing.target_spacing``, then the median of the
    training sites' fingerprints.

    Raises:
        ConfigError: no spacing and no complete set of fingerprints.
    """
    if target_spacing is None and cfg.preprocessing.target_spacing is None:
        target_spacing = plan_target_spacing(load_fingerprints(cfg))
    return PreprocessSettings.from_config(cfg, target_spacing)


MASKED_ZERO_FRACTION = 0.01
"""An MR channel with at least this fraction of exact zeros is taken as masked."""
FOREGROUND_MARGIN = 2
"""Voxels kept around the foreground's bounding box."""


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _foreground_masks(
    image: Any, available: np.ndarray, masked: np.ndarray, norms: Sequence[Any]
) -> Any:
    """Per-channel foreground ``(C, X, Y, Z)`` bool.

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
                sample = flat[:: max(1, flat.numel() // 500_000)].float().numpy()
                masks[c] = ch > otsu_threshold(sample)
        elif norm.kind == "ct_window" and norm.window is not None:
            masks[c] = ch > norm.window[0]
        else:
            masks[c] = ch != 0
    return masks


def _zscore(channel: Any, mask: Any) -> Any:
    """``(x - mean) / std`` with mean and std over the channel's foreground voxels.

    Voxels that are exactly zero (a masked scan's background, padding from resampling)
    stay zero, as with MONAI's ``NormalizeIntensity(nonzero=True)``.
    """
    import torch

    values = channel[mask] if bool(mask.any()) else channel.reshape(-1)
    mean, std = values.mean(), values.std()
    if not bool(std > 1e-6):  # a constant foreground: centre it, nothing to scale
        std = torch.ones(())
    return torch.where(channel != 0, (channel - mean) / std, torch.zeros(()))


def _largest_component(mask: Any) -> Any:
    """The largest 26-connected component of a 3D bool tensor (drops isolated noise voxels)."""
    import torch
    from scipy import ndimage

    arr = mask.cpu().numpy()
    labels, n = ndimage.label(arr, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return torch.from_numpy(labels == int(sizes.argmax()))
