"""Preprocessing cache: first pass vs cached pass, and per-epoch loading cost (issue 7).

A synthetic site (``fedmed.data.synth``, full-size 3-modality brains; or plain synthetic
NIfTI volumes of ~100x120x100 when the generator is unavailable) is written to a temp dir.

Figures:

* ``first_over_cached``: time to preprocess + load every case (empty cache) over time to
  load every case from the cache (every voxel touched in both). Target >= 10x.
* ``nifti_epoch_over_cached_epoch``: one epoch of patches when every case is re-read from
  NIfTI and preprocessed each epoch, over the same epoch from the memory-mapped cache.
* ``cached_epoch_over_memory_epoch``: the cached epoch over an epoch from cases held in
  memory (the cost of memory mapping; close to 1 is good).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Figure

NAME = "cache"


def _write_plain_site(root: Path, cases: int, shape: tuple[int, int, int]) -> None:
    """Fallback site: folder-per-case, 3 modalities, ellipsoid head with noise, 1 mm LPS."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, dtype=np.float32) - 1) / 2
    r = ((idx - c[:, None, None, None]) / (0.4 * np.asarray(shape))[:, None, None, None]) ** 2
    head = r.sum(0) <= 1
    inner = r.sum(0) <= 0.5
    for i in range(cases):
        d = root / f"case_{i:03d}"
        d.mkdir(parents=True)
        for k, m in enumerate(("T1", "T2", "FLAIR")):
            img = (head * 300 + inner * 200 * (k + 1)).astype(np.float32)
            img = img + rng.normal(0, 10, shape).astype(np.float32) * head
            nib.save(nib.Nifti1Image(img.astype(np.int16), aff), str(d / f"{m}.nii.gz"))
        lab = (head.astype(np.uint8) + inner.astype(np.uint8))
        nib.save(nib.Nifti1Image(lab, aff), str(d / "label.nii.gz"))


def _make_site(tmp: Path, cases: int, quick: bool) -> tuple[Path, str]:
    try:
        from fedmed.data import synth

        cfg = synth.generate_federation(
            tmp / "fed", sites=1, cases_per_site=cases, test_cases=0, unseen_cases=0,
            seed=0, progress=False, scale=1.5 if quick else 1.0,
        )
        from fedmed.config import load_config

        site = load_config(cfg).site_dir(load_config(cfg).site_names[0])
        return site, "synth (MNI152-derived)"
    except (ImportError, AttributeError):
        shape = (60, 72, 60) if quick else (100, 120, 100)
        _write_plain_site(tmp / "site", cases, shape)
        return tmp / "site", f"plain NIfTI {shape}"


def _touch(pre) -> float:  # type: ignore[no-untyped-def]
    # Read every voxel so a memory map is really loaded.
    return float(np.asarray(pre.image).sum()) + float(np.asarray(pre.label).sum())


def _epoch(cases, seed: int = 0) -> float:  # type: ignore[no-untyped-def]
    from fedmed.config import PreprocessingConfig
    from fedmed.data.dataset import PatchDataset

    cfg = PreprocessingConfig(patch_size=(64, 64, 64), patches_per_case=2, augment=False)
    ds = PatchDataset(cases, cfg, num_classes=5, seed=seed)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t


def run(quick: bool = False) -> list[Figure]:
    """Measure the cache; ``quick``: fewer, smaller cases."""
    from fedmed.data.cache import CaseCache
    from fedmed.data.formats import load_site
    from fedmed.data.planning import PreprocessSettings
    from fedmed.data.preprocess import PreprocessedCase, preprocess_case

    n_cases = 2 if quick else 5
    modalities = ("T1", "T2", "FLAIR")
    settings = PreprocessSettings(
        modalities=modalities, target_spacing=(2.2, 2.2, 2.2), patch_size=(64, 64, 64)
    )
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-cache-") as tmpd:
        tmp = Path(tmpd)
        site, source = _make_site(tmp, n_cases, quick)
        manifest = load_site(site, expected_modalities=modalities)
        cases = list(manifest.cases)
        cache_dir = tmp / "cache"
        # Warm-up outside the timings: imports and MONAI/torch initialisation are paid once
        # per process, not per case.
        preprocess_case(cases[0], settings)

        t = time.perf_counter()
        cache = CaseCache(cache_dir, settings)
        for c in cases:
            _touch(cache.get(c))
        first = time.perf_counter() - t

        t = time.perf_counter()
        cache = CaseCache(cache_dir, settings)
        cached = [cache.get(c) for c in cases]
        for pre in cached:
            _touch(pre)
        second = time.perf_counter() - t
        if cache.hits != len(cases):
            raise RuntimeError(f"cached pass had {cache.misses} misses; the cache is broken")

        # Issue 7: one epoch of patches, three ways.
        cached = [CaseCache(cache_dir, settings).get(c) for c in cases]
        t_cached = _epoch(cached)
        in_memory = [
            PreprocessedCase(p.case_id, np.array(p.image), np.array(p.label), p.available, p.affine)
            for p in cached
        ]
        t_memory = _epoch(in_memory)
        t = time.perf_counter()
        reread = [preprocess_case(c, settings) for c in cases]
        t_nifti = time.perf_counter() - t + _epoch(reread)
        shapes = [p.spatial_shape for p in cached]
    n_patches = 2 * len(cases)
    where = f"{len(cases)} cases ({source}), preprocessed shapes {min(shapes)}..{max(shapes)}"
    ratio = first / second
    return [
        Figure(
            NAME, "first_over_cached", ratio, "x", ">= 10x", ratio >= 10,
            f"first pass (read NIfTI + preprocess + store) {first:.2f} s, cached pass "
            f"(memory-mapped, every voxel read) {second:.3f} s; {where}",
            {"first_s": first, "cached_s": second, "cases": len(cases)},
        ),
        Figure(
            NAME, "nifti_epoch_over_cached_epoch", t_nifti / t_cached, "x", ">= 10x",
            t_nifti / t_cached >= 10,
            f"epoch of {n_patches} 64^3 patches: re-reading NIfTI {t_nifti:.2f} s, cached "
            f"{t_cached:.3f} s",
            {"nifti_epoch_s": t_nifti, "cached_epoch_s": t_cached},
        ),
        Figure(
            NAME, "cached_epoch_over_memory_epoch", t_cached / t_memory, "x", "<= 2x",
            t_cached / t_memory <= 2,
            f"epoch of {n_patches} 64^3 patches: cached {t_cached:.3f} s, in-memory arrays "
            f"{t_memory:.3f} s",
            {"cached_epoch_s": t_cached, "memory_epoch_s": t_memory},
        ),
    ]


if __name__ == "__main__":
    for fig in run(quick="--quick" in sys.argv):
        print(f"{fig.name}: {fig.value:.2f} {fig.unit} (target {fig.target}, met {fig.met}) "
              f"-- {fig.detail}")
