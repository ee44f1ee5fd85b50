"""Planning: the sites' fingerprints plus the federation config -> preprocessing settings.

:func:`plan_preprocessing` is the one way to turn a config into
:class:`PreprocessSettings`: every command (``fedmed data preprocess``, the baselines, the
coordinator, the sites, ``fedmed predict``) calls it, so all of them preprocess alike. When
the config leaves ``preprocessing.target_spacing`` unset, the spacing is planned from the
training sites' fingerprints (:func:`plan_target_spacing`), nnU-Net style, without any voxel
leaving a site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.data.fingerprint import load_site_fingerprints, rounded
from fedmed.data.read_rules import DEFAULT_MAX_MEGAVOXELS
from fedmed.errors import ConfigError, DatasetFormatError, PreprocessingError

if TYPE_CHECKING:
    from fedmed.config import FederationConfig, PreprocessingConfig


@dataclass(frozen=True)
class ModalityNormalization:
    """How one modality's intensities are normalised (resolved from the config).

    Attributes:
        kind: ``"zscore"`` (MR: over the channel's foreground), ``"ct_window"`` (clip to
            ``window`` and scale to [0, 1]) or ``"none"``.
        window: the CT window (HU) for ``ct_window``.
    """

    kind: str = "zscore"
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that determines the preprocessed output (and so the cache key).

    Build it from a config with :func:`plan_preprocessing`; construct it directly only where
    there is no config (tests, benchmarks).

    Attributes:
        modalities: the federation's modalities, in channel order.
        target_spacing: voxel size (mm) after resampling.
        orientation: axis codes of the output (``"RAS"``).
        normalization: one entry per modality, in ``modalities`` order.
        crop_foreground: crop to the foreground's bounding box.
        patch_size: the output is padded to at least this.
        cache_dir: default cache folder from the config (``None``: ``<site>/.fedmed-cache``);
            not part of the key.
        max_megavoxels: the reader's size limit per channel for every file of a case
            (:func:`fedmed.data.io.read_image`; the config's
            ``preprocessing.max_case_megavoxels``, at a federated site the policy's
            ``data.max_image_megavoxels``); not part of the key.
    """

    modalities: tuple[str, ...]
    target_spacing: tuple[float, float, float]
    orientation: str = "RAS"
    normalization: tuple[ModalityNormalization, ...] = ()
    crop_foreground: bool = True
    patch_size: tuple[int, int, int] = (64, 64, 64)
    cache_dir: Path | None = field(default=None, compare=False)
    max_megavoxels: float = field(default=DEFAULT_MAX_MEGAVOXELS, compare=False)

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
        if not self.max_megavoxels > 0:
            raise ConfigError(
                "preprocessing.max_case_megavoxels must be a positive number (millions of "
                f"voxels per channel), got {self.max_megavoxels!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form of the fields that determine the output (not folder or limit)."""
        return {
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


def plan_target_spacing(fingerprints: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
    """The target spacing for the federation: median across sites of their median spacings.

    Args:
        fingerprints: one per site (from :func:`fedmed.data.fingerprint.load_fingerprint`);
            sites without a valid case (``median_spacing`` null) are skipped.

    Returns:
        ``(sx, sy, sz)`` in mm, rounded to 0.01 mm.

    Raises:
        PreprocessingError: no fingerprint has a median spacing.
        DatasetFormatError: a fingerprint's ``median_spacing`` is malformed.
    """
    medians = []
    for i, fp in enumerate(fingerprints):
        ms = fp.get("median_spacing")
        if ms is None:
            continue
        try:
            triple = [float(v) for v in ms]
        except (TypeError, ValueError):
            triple = []
        if len(triple) != 3 or not all(np.isfinite(triple)) or min(triple) <= 0:
            raise DatasetFormatError(
                f"fingerprint {i} (site {fp.get('site')!r}): median_spacing must be 3 positive "
                f"numbers (mm), got {ms!r}; re-run `fedmed data check` at that site"
            )
        medians.append(triple)
    if not medians:
        raise PreprocessingError(
            "cannot plan the target spacing: no site fingerprint has a median spacing (no "
            "valid case, or fewer valid cases than the site policy's k); run `fedmed data "
            "check` at each site, fix the reported cases, or set "
            "preprocessing.target_spacing in the config"
        )
    med = np.median(np.asarray(medians), axis=0)
    return (rounded(med[0], 2), rounded(med[1], 2), rounded(med[2], 2))


def _normalizations(
    pre: PreprocessingConfig, modalities: Sequence[str]
) -> tuple[ModalityNormalization, ...]:
    """The config's normalisation of each modality (z-score where it names none)."""
    out = []
    for m in modalities:
        n = pre.normalization.get(m)
        if n is None:
            out.append(ModalityNormalization())
            continue
        window = None if n.window is None else (float(n.window[0]), float(n.window[1]))
        out.append(ModalityNormalization(n.kind, window))
    return tuple(out)


def plan_preprocessing(
    cfg: FederationConfig,
    *,
    target_spacing: Sequence[float] | None = None,
    fingerprints: Sequence[Mapping[str, Any]] | None = None,
) -> PreprocessSettings:
    """The preprocessing settings of a federation: the only way to build them from a config.

    The target spacing is, in this order: ``target_spacing`` (e.g. the spacing a trained
    model was preprocessed with), ``cfg.preprocessing.target_spacing``, then the median of
    the training sites' fingerprints (:func:`plan_target_spacing`).

    Args:
        cfg: the federation config.
        target_spacing: overrides the config's spacing (mm).
        fingerprints: the sites' fingerprints to plan from; default: read from
            ``<site>/fingerprint.json`` of every training site, only when a spacing must be
            planned.

    Raises:
        ConfigError: no spacing given and a site has no fingerprint.
        DatasetFormatError: a fingerprint is unreadable or malformed.
        PreprocessingError: no fingerprint has a valid case.
    """
    pre = cfg.preprocessing
    spacing = target_spacing if target_spacing is not None else pre.target_spacing
    if spacing is None:
        fps = fingerprints if fingerprints is not None else load_site_fingerprints(cfg)
        spacing = plan_target_spacing(fps)
    return PreprocessSettings(
        modalities=tuple(cfg.modalities),
        target_spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        orientation=pre.orientation,
        normalization=_normalizations(pre, cfg.modalities),
        crop_foreground=pre.crop_foreground,
        patch_size=(int(pre.patch_size[0]), int(pre.patch_size[1]), int(pre.patch_size[2])),
        cache_dir=None if pre.cache_dir is None else cfg.resolve(pre.cache_dir),
        max_megavoxels=float(pre.max_case_megavoxels),
    )
