"""Site cases for training: splits, loading through the cache, and the patch dataset."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmed.data.cache import CaseCache, default_cache_dir
from fedmed.data.formats import Case, SiteManifest, load_site
from fedmed.data.planning import plan_preprocessing
from fedmed.data.preprocess import PreprocessedCase
from fedmed.data.transforms import (
    augment,
    build_augmentation,
    center_of,
    class_indices,
    class_ratios,
    crop_patch,
    sample_center,
)
from fedmed.errors import PreprocessingError, TrainingError
from fedmed.policy import DataPolicy, site_policy_for

if TYPE_CHECKING:
    from fedmed.config import FederationConfig, PreprocessingConfig

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test", "all"]
_SPLITS = ("train", "val", "test", "all")


def split_cases(
    case_ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Deterministic train / val / test split of a site's cases.

    The ids are sorted first, so the split depends only on the set of ids and the seed.
    With at least 3 cases, every split whose fraction is positive gets at least one case
    and train always keeps at least one.

    Hand-written rather than ``monai.data.partition_dataset(ratios=...)``: MONAI rounds each
    ratio on its own, so small sites get empty splits (3 cases at 0.7 / 0.15 / 0.15 give
    2 / 0 / 0), and its shuffle (``RandomState``) would move every existing site's cases to
    other splits.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (each sorted).
    """
    ids = sorted(set(case_ids))
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        while n_test + n_val > n - 1:  # keep a training case
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
    else:
        n_test = n_val = 0
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _labelled(manifest: SiteManifest) -> list[Case]:
    out = []
    for case in manifest.cases:
        if case.label is None or not case.label.exists():
            log.warning(
                "site %s: case %r has no label file (%s); skipped for training/evaluation",
                manifest.name,
                case.case_id,
                case.label,
            )
            continue
        out.append(case)
    return out


SPLIT_FILE = "split.json"


def fixed_split(
    state_dir: Path, case_ids: Sequence[str], val_fraction: float, test_fraction: float,
    seed: int,
) -> dict[str, list[str]]:
    """The site's split, drawn once and then kept in ``<state_dir>/split.json``.

    The first call draws it with :func:`split_cases`; later calls reuse it whatever the
    fractions they pass, so nobody (a coordinator least of all) can re-split the site to
    move chosen patients into an evaluated split. Cases that appear later are split among
    themselves with the same settings and added; cases that disappeared are dropped.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (each sorted).
    """
    path = Path(state_dir) / SPLIT_FILE
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            stored = {str(k): str(v) for k, v in json.loads(path.read_text())["cases"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s is unreadable; the split is drawn again", path)
            stored = {}
    ids = sorted(set(case_ids))
    new = [c for c in ids if c not in stored]
    if new:
        for part, members in split_cases(new, val_fraction, test_fraction, seed).items():
            stored.update(dict.fromkeys(members, part))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SPLIT_FILE}.tmp")
        tmp.write_text(json.dumps({
            "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
            "cases": dict(sorted(stored.items())),
        }, indent=1))
        tmp.replace(path)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in ids:
        out[stored[c]].append(c)
    return out


def site_case_ids(cfg: FederationConfig, site_name: str, data_dir: str | Path | None = None
                  ) -> list[str]:
    """The ids of a site's labelled cases, from its manifest alone (no voxel is read)."""
    root = Path(data_dir) if data_dir is not None else cfg.site_dir(site_name)
    manifest = load_site(root, expected_modalities=cfg.modalities, name=site_name)
    return [c.case_id for c in _labelled(manifest)]


@dataclass(frozen=True)
class SiteSplit:
    """Where a site's split is kept and how it is drawn the first time.

    Attributes:
        state_dir: the site's state folder (``split.json``).
        settings: the site's own split settings (its policy's ``data`` section).
    """

    state_dir: Path
    settings: DataPolicy

    def ids(self, case_ids: Sequence[str]) -> dict[str, list[str]]:
        """The fixed split of ``case_ids`` (see :func:`fixed_split`)."""
        d = self.settings
        return fixed_split(self.state_dir, case_ids, d.val_fraction, d.test_fraction,
                           d.split_seed)

    @classmethod
    def simulated(cls, cfg: FederationConfig, site_name: str) -> SiteSplit:
        """A simulated site's split: its state folder and policy from the config."""
        return cls(cfg.site_state_dir(site_name), site_policy_for(cfg, site_name).data)


def site_split_ids(
    cfg: FederationConfig, site_name: str, *, data_dir: str | Path | None = None,
    fixed: SiteSplit | None = None,
) -> dict[str, list[str]]:
    """A site's train / val / test case ids (no voxel is read).

    With ``fixed`` the split is the site's fixed one; without, it is drawn afresh from the
    config's ``training`` fractions and seed.
    """
    return _split(cfg, site_case_ids(cfg, site_name, data_dir), fixed)


def _split(cfg: FederationConfig, ids: Sequence[str], fixed: SiteSplit | None
           ) -> dict[str, list[str]]:
    if fixed is not None:
        return fixed.ids(ids)
    tr = cfg.training
    return split_cases(ids, tr.val_fraction, tr.test_fraction, tr.seed)


def load_site_cases(
    cfg: FederationConfig,
    site_name: str,
    split: Split,
    cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    fixed: SiteSplit | None = None,
) -> list[PreprocessedCase]:
    """A site's labelled cases of one split, preprocessed through the cache.

    Args:
        cfg: the federation config (modalities, preprocessing, split fractions and seed).
        site_name: the site.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        cache_dir: default: the config's ``preprocessing.cache_dir``, else
            ``<site>/.fedmed-cache``.
        data_dir: the site's folder; overrides ``cfg.site_dir(site_name)`` (deployment).
        fixed: the site's fixed split (:class:`SiteSplit`); ``None``: drawn afresh from the
            config's ``training`` fractions and seed.

    Raises:
        ConfigError: unknown site, or no target spacing and no fingerprints.
        DatasetFormatError: the folder is not a supported layout.
        ImageReadError, PreprocessingError: a case cannot be preprocessed.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else cfg.site_dir(site_name)
    manifest = load_site(root, expected_modalities=cfg.modalities, name=site_name)
    cases = _labelled(manifest)
    if split != "all":
        chosen = set(_split(cfg, [c.case_id for c in cases], fixed)[split])
        cases = [c for c in cases if c.case_id in chosen]
    settings = plan_preprocessing(cfg)
    cache = CaseCache(default_cache_dir(manifest.root, settings, cache_dir), settings)
    return [cache.get(c) for c in cases]


def load_test_cases(
    cfg: FederationConfig, path: str | Path, cache_dir: str | Path | None = None
) -> list[PreprocessedCase]:
    """Every labelled case of a central test set or unseen site folder, through the cache.

    Args:
        cfg: the federation config.
        path: the folder (relative paths are resolved against the config's folder).
        cache_dir: as in :func:`load_site_cases`.
    """
    root = cfg.resolve(Path(path))
    manifest = load_site(root, expected_modalities=cfg.modalities)
    settings = plan_preprocessing(cfg)
    cache = CaseCache(default_cache_dir(manifest.root, settings, cache_dir), settings)
    return [cache.get(c) for c in _labelled(manifest)]


class PatchDataset(Dataset):
    """Patches of preprocessed cases for the trainer.

    Item ``i`` comes from case ``i // patches_per_case``. Its random draws (centre and
    augmentation) are seeded by ``(seed, epoch, i)`` only, so the same seed gives the same
    patches whatever the DataLoader's worker count or order. Per-class voxel indices are
    computed once per case (lazily, in each worker).

    Item: ``{"image": (C, P, P, P) float32, "label": (1, P, P, P) int64,
    "available": (C,) bool, "case_index": int}``.
    """

    def __init__(
        self,
        cases: Sequence[PreprocessedCase],
        preprocessing: PreprocessingConfig,
        num_classes: int,
        seed: int,
        train: bool = True,
    ) -> None:
        """Create the dataset.

        Args:
            cases: labelled preprocessed cases.
            preprocessing: patch size, patches per case, class balance and augmentation.
            num_classes: labels including background.
            seed: base seed of every random draw.
            train: random balanced patches (+ augmentation when ``preprocessing.augment``);
                ``False``: the centred patch of each case, no augmentation.

        Raises:
            TrainingError: no cases, or a case without label.
        """
        if not cases:
            raise TrainingError("PatchDataset needs at least one case; the split is empty")
        for c in cases:
            if c.label is None:
                raise TrainingError(
                    f"case {c.case_id!r} has no label; training and evaluation need labels"
                )
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in preprocessing.patch_size)
        self.patches_per_case = int(preprocessing.patches_per_case)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.train = bool(train)
        self.epoch = 0
        self._ratios = class_ratios(self.num_classes, preprocessing.class_balance)
        augmenting = train and preprocessing.augment
        self._augment = build_augmentation(self.patch_size) if augmenting else None
        self._indices: dict[int, list[np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws reproducibly (call once per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.patches_per_case

    def _case_indices(self, ci: int) -> list[np.ndarray]:
        if ci not in self._indices:
            label = np.asarray(self.cases[ci].label)
            if int(np.max(label)) >= self.num_classes:
                raise PreprocessingError(
                    f"case {self.cases[ci].case_id!r}: label value {int(np.max(label))} >= "
                    f"num_classes {self.num_classes}; fix the label map or the config's labels"
                )
            self._indices[ci] = class_indices(label, self.num_classes)
        return self._indices[ci]

    def _seeds(self, index: int) -> tuple[int, int]:
        ss = np.random.SeedSequence([self.seed, self.epoch, index])
        a, b = ss.generate_state(2)
        return int(a), int(b)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range 0..{len(self) - 1}")
        ci = index // self.patches_per_case
        case = self.cases[ci]
        shape = case.spatial_shape
        if self.train:
            center_seed, aug_seed = self._seeds(index)
            rng = np.random.RandomState(center_seed)
            indices = self._case_indices(ci) if self._ratios else None
            center = sample_center(shape, self.patch_size, indices, self._ratios, rng)
        else:
            center = center_of(shape)
        image = crop_patch(case.image, center, self.patch_size).astype(np.float32, copy=False)
        label = crop_patch(case.label, center, self.patch_size)  # type: ignore[arg-type]
        available = np.asarray(case.available, dtype=bool)
        if self._augment is not None:
            img_t, lab_t = augment(self._augment, image, label, available, aug_seed)
        else:
            img_t = torch.from_numpy(image)
            img_t[torch.from_numpy(~available)] = 0.0
            lab_t = torch.from_numpy(label.astype(np.int64))
        return {
            "image": img_t,
            "label": lab_t,
            "available": torch.from_numpy(available.copy()),
            "case_index": ci,
        }
