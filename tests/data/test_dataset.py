"""Splits, site loading through the cache, and the patch dataset."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fedmed.data.preprocess as pp
from fedmed.config import PreprocessingConfig, load_config
from fedmed.data.dataset import PatchDataset, load_site_cases, load_test_cases, split_cases
from fedmed.data.preprocess import PreprocessedCase
from fedmed.errors import TrainingError

os.environ.setdefault("OMP_NUM_THREADS", "1")


def synthetic_case(
    shape=(40, 44, 36), channels=3, available=(True, True, True), lesion=True, seed=0
) -> PreprocessedCase:
    """A preprocessed-looking case: nested boxes of classes 1..3 and a tiny lesion (class 4)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((1, *shape), np.uint8)
    x, y, z = shape
    lab[0, 4 : x - 4, 4 : y - 4, 4 : z - 4] = 1
    lab[0, 8 : x - 8, 8 : y - 8, 8 : z - 8] = 2
    lab[0, 12 : x - 12, 12 : y - 12, 12 : z - 12] = 3
    if lesion:  # 2x2x2 voxels near a corner of the brain: < 1% of the volume
        lab[0, 6:8, 6:8, 6:8] = 4
    img = rng.normal(size=(channels, *shape)).astype(np.float32) + lab.astype(np.float32)
    avail = np.asarray(available, dtype=bool)
    img[~avail] = 0.0
    return PreprocessedCase(f"case{seed}", img, lab, avail, np.eye(4))


def pre_cfg(**kw) -> PreprocessingConfig:
    base = {"patch_size": (16, 16, 16), "patches_per_case": 3, "augment": False}
    base.update(kw)
    return PreprocessingConfig(**base)


# --------------------------------------------------------------------------- splits


def test_split_cases_deterministic_disjoint_and_complete():
    ids = [f"c{i:02d}" for i in range(20)]
    a = split_cases(ids, 0.15, 0.2, seed=0)
    assert a == split_cases(list(reversed(ids)), 0.15, 0.2, seed=0)
    assert sorted(a["train"] + a["val"] + a["test"]) == ids
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (13, 3, 4)
    assert a != split_cases(ids, 0.15, 0.2, seed=1)


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_split_cases_every_split_nonempty_from_three(n):
    parts = split_cases([f"c{i}" for i in range(n)], 0.1, 0.1, seed=3)
    assert all(len(parts[k]) >= 1 for k in ("train", "val", "test"))
    assert sum(len(v) for v in parts.values()) == n


def test_split_cases_tiny_sites_train_everything():
    assert split_cases(["a", "b"], 0.2, 0.2, seed=0) == {"train": ["a", "b"], "val": [], "test": []}


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize(
    "shape,channels,patch,train",
    [
        ((40, 44, 36), 3, (16, 16, 16), True),
        ((40, 44, 36), 1, (16, 24, 16), True),
        ((40, 44, 36), 2, (16, 16, 16), False),
        ((12, 44, 36), 3, (16, 16, 16), True),  # smaller than the patch: zero-padded
    ],
)
def test_patch_shapes(shape, channels, patch, train):
    cases = [synthetic_case(shape, channels, (True,) * channels, seed=s) for s in range(2)]
    ds = PatchDataset(cases, pre_cfg(patch_size=patch, augment=True), 5, seed=0, train=train)
    assert len(ds) == 6
    item = ds[5]
    assert item["image"].shape == (channels, *patch) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, *patch) and item["label"].dtype == torch.int64
    assert item["available"].shape == (channels,) and item["available"].dtype == torch.bool
    assert item["case_index"] == 1
    assert int(item["label"].max()) < 5
    with pytest.raises(IndexError):
        ds[6]


def test_patches_deterministic_in_any_order_and_change_with_epoch():
    cases = [synthetic_case(seed=s) for s in range(3)]
    cfg = pre_cfg(augment=True)
    a = PatchDataset(cases, cfg, 5, seed=7)
    b = PatchDataset(cases, cfg, 5, seed=7)
    order = list(range(len(a)))
    first = [a[i] for i in order]
    second = {i: b[i] for i in reversed(order)}  # another "worker order"
    for i in order:
        assert torch.equal(first[i]["image"], second[i]["image"])
        assert torch.equal(first[i]["label"], second[i]["label"])
    b.set_epoch(1)
    assert any(not torch.equal(first[i]["image"], b[i]["image"]) for i in order)
    c = PatchDataset(cases, cfg, 5, seed=8)
    assert any(not torch.equal(first[i]["image"], c[i]["image"]) for i in order)


def test_class_balance_shows_the_small_class():
    case = synthetic_case(shape=(64, 64, 64))
    assert (case.label == 4).mean() < 0.01
    ds = PatchDataset([case], pre_cfg(patches_per_case=200), 5, seed=0)
    with_lesion = sum(int((ds[i]["label"] == 4).any()) for i in range(len(ds)))
    assert with_lesion >= 0.2 * len(ds)
    uniform = PatchDataset([case], pre_cfg(patches_per_case=200, class_balance=False), 5, seed=0)
    without_balance = sum(int((uniform[i]["label"] == 4).any()) for i in range(len(uniform)))
    assert with_lesion > without_balance


def test_augmentation_keeps_unavailable_channels_zero_and_changes_patches():
    case = synthetic_case(available=(True, False, True))
    plain = PatchDataset([case], pre_cfg(patches_per_case=12), 5, seed=1)
    aug = PatchDataset([case], pre_cfg(patches_per_case=12, augment=True), 5, seed=1)
    changed = 0
    for i in range(len(aug)):
        item = aug[i]
        assert torch.count_nonzero(item["image"][1]) == 0
        assert item["available"].tolist() == [True, False, True]
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3, 4}
        changed += int(not torch.equal(item["image"], plain[i]["image"]))
    assert changed >= 10


def test_eval_patches_are_centred_and_not_augmented():
    case = synthetic_case()
    ds = PatchDataset([case], pre_cfg(augment=True), 5, seed=0, train=False)
    item = ds[0]
    expected = case.image[:, 12:28, 14:30, 10:26]
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    assert torch.equal(ds[1]["image"], item["image"])
    np.testing.assert_array_equal(item["label"].numpy(), case.label[:, 12:28, 14:30, 10:26])


def test_patch_dataset_rejects_unlabelled_and_empty():
    case = synthetic_case()
    with pytest.raises(TrainingError, match="no label"):
        PatchDataset([PreprocessedCase("u", case.image, None, case.available, case.affine)],
                     pre_cfg(), 5, seed=0)
    with pytest.raises(TrainingError, match="at least one case"):
        PatchDataset([], pre_cfg(), 5, seed=0)


# --------------------------------------------------------------------------- loading


def _write_config(tmp_path: Path, sites: dict[str, Path], **pre) -> Path:
    data = {
        "modalities": ["T1", "T2", "FLAIR"],
        "labels": {0: "background", 1: "tissue", 2: "lesion"},
        "sites": [{"name": n, "path": str(p)} for n, p in sites.items()],
        "central_test": "test",
        "preprocessing": {"target_spacing": [2.0, 2.0, 2.0], "patch_size": [16, 16, 16], **pre},
        "training": {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
    }
    p = tmp_path / "fed.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_load_site_cases_splits_skips_unlabelled_and_uses_cache(
    tmp_path, make_site, monkeypatch, caplog
):
    site = make_site(tmp_path / "a", fmt="folder", n_cases=6)
    (site / "case_005" / "label.nii.gz").unlink()
    cfg = load_config(_write_config(tmp_path, {"a": site}))
    with caplog.at_level(logging.WARNING, logger="fedmed.data.dataset"):
        parts = {s: load_site_cases(cfg, "a", s) for s in ("train", "val", "test")}
    assert "case_005" in caplog.text
    ids = {s: [c.case_id for c in v] for s, v in parts.items()}
    assert sorted(sum(ids.values(), [])) == [f"case_{i:03d}" for i in range(5)]
    assert all(ids[s] for s in ids)
    assert all(c.image.shape[0] == 3 and c.label is not None for v in parts.values() for c in v)
    assert (site / ".fedmed-cache").is_dir()
    reads: list[Path] = []
    real = pp.read_image
    monkeypatch.setattr(pp, "read_image", lambda p, **kw: reads.append(p) or real(p, **kw))
    again = load_site_cases(cfg, "a", "all", data_dir=site)
    assert len(again) == 5 and reads == []
    assert isinstance(again[0].image, np.memmap)
    own = load_site_cases(cfg, "a", "val", cache_dir=tmp_path / "elsewhere")
    assert [c.case_id for c in own] == ids["val"] and len(reads) > 0
    assert (tmp_path / "elsewhere").is_dir()


def test_load_test_cases(tmp_path, make_site):
    site = make_site(tmp_path / "a", fmt="folder", n_cases=3)
    make_site(tmp_path / "test", fmt="msd", n_cases=2)
    cfg = load_config(_write_config(tmp_path, {"a": site}))
    cases = load_test_cases(cfg, cfg.central_test)
    assert [c.case_id for c in cases] == ["case_000", "case_001"]
    assert all(c.spacing == pytest.approx((2.0, 2.0, 2.0)) for c in cases)


def test_augmenting_memory_mapped_cases_leaves_the_cache_intact(tmp_path, make_site):
    site = make_site(tmp_path / "a", fmt="folder", n_cases=2)
    cfg = load_config(_write_config(tmp_path, {"a": site}))
    cases = load_site_cases(cfg, "a", "all")
    assert isinstance(cases[0].image, np.memmap)
    before = [np.array(c.image) for c in cases]
    # Patch as large as the (padded) volume: the crop is the whole memory map.
    patch = cases[0].spatial_shape
    ds = PatchDataset(cases[:1], pre_cfg(patch_size=patch, patches_per_case=8, augment=True), 3, 0)
    for i in range(len(ds)):
        item = ds[i]
        item["image"].add_(1.0)  # the trainer may modify its batch in place
    again = load_site_cases(cfg, "a", "all")
    for b, c in zip(before, again, strict=True):
        np.testing.assert_array_equal(b, c.image)
