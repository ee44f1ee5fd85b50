"""The on-disk case cache, the site-wide preprocessing run and `fedmed data preprocess`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

import fedmed.data.cache as cache_mod
from fedmed.data.cache import CaseCache, preprocess_site, settings_key
from fedmed.data.formats import load_site
from fedmed.errors import PreprocessingError
from tests.support.fingerprints import write_stub_fingerprint
from tests.support.grids import (
    RAS,
    grid_affine,
    settings,
    small_case,
    world_object,
    write_case,
    write_nifti,
)

# --------------------------------------------------------------------------- cache


def test_cache_hit_does_not_read_images(tmp_path, counting_reader):
    case = small_case(tmp_path / "site")
    s = settings()
    first = CaseCache(tmp_path / "cache", s).get(case)
    assert len(counting_reader) == 3
    cache = CaseCache(tmp_path / "cache", s)
    second = cache.get(case)
    assert len(counting_reader) == 3 and cache.hits == 1 and cache.misses == 0
    assert isinstance(second.image, np.memmap)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    np.testing.assert_allclose(first.affine, second.affine)
    assert second.available.tolist() == [True, True] and second.case_id == "c0"
    entries = [p for p in cache.root.iterdir()]
    assert len(entries) == 1 and cache.root.parent == tmp_path / "cache"


def test_cache_invalidated_by_file_change_and_settings(tmp_path, counting_reader):
    aff = grid_affine(RAS, (2, 2, 2), (30, 28, 34))
    case = write_case(tmp_path / "site", "c0", aff, (30, 28, 34))
    cache = CaseCache(tmp_path / "cache", settings())
    before = cache.get(case)
    assert cache.misses == 1
    # Rewrite T2 with other content and a later mtime.
    img, _ = world_object(aff, (30, 28, 34))
    t2 = case.images["T2"].path
    write_nifti(t2, img * 7 + 50 * (img > 0), aff)
    st = t2.stat()
    os.utime(t2, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = cache.get(case)
    assert cache.misses == 2 and len(counting_reader) == 6
    assert not np.array_equal(before.image[1], after.image[1])
    assert len(list(cache.root.iterdir())) == 1  # the stale entry was replaced
    assert cache.get(case) is not None and cache.hits == 1
    other = CaseCache(tmp_path / "cache", settings(spacing=(2.5, 2.5, 2.5)))
    assert not other.contains(case)
    pre = other.get(case)
    assert other.misses == 1 and pre.spacing == pytest.approx((2.5, 2.5, 2.5))


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    case = small_case(tmp_path / "site")
    cache = CaseCache(tmp_path / "cache", settings())
    real_save = np.save
    calls = {"n": 0}

    def dying_save(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # killed while writing the label
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(cache_mod.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.get(case)
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    assert not cache.contains(case)
    assert list(cache.root.iterdir()) == []  # neither a partial entry nor a temp folder
    assert cache.get(case).label is not None and cache.contains(case)


def test_preprocess_site_counts_hits_and_failures(tmp_path):
    aff = grid_affine(RAS, (2, 2, 2), (30, 28, 34))
    for i in range(2):
        write_case(tmp_path / "site", f"c{i}", aff, (30, 28, 34))
    (tmp_path / "site" / "c2").mkdir()
    (tmp_path / "site" / "c2" / "T1.nii.gz").write_bytes(b"not a nifti")
    manifest = load_site(tmp_path / "site", expected_modalities=("T1", "T2"))
    s = settings()
    first = preprocess_site(manifest, s, progress=False)
    assert (first.cases, first.hits, first.misses) == (3, 0, 2)
    assert [f[0] for f in first.failed] == ["c2"]
    assert first.cache_dir == tmp_path / "site" / ".fedmed-cache" / settings_key(s)
    assert first.missing_channels == {"T1": 0, "T2": 0}
    second = preprocess_site(manifest, s, cache_dir=None, progress=False)
    assert (second.hits, second.misses) == (2, 0)
    assert second.min_shape is not None and min(second.min_shape) >= 16


# --------------------------------------------------------------------------- CLI


def test_cli_preprocess(tmp_path, make_site, capsys):
    from fedmed.cli.main import main

    site = make_site(tmp_path / "site-a", fmt="nnunet", n_cases=2, shape=(16, 16, 16))
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "modalities": ["T1", "T2", "FLAIR"],
                "labels": {0: "background", 1: "tissue", 2: "lesion"},
                "sites": [{"name": "site-a", "path": "site-a"}],
                "preprocessing": {"patch_size": [16, 16, 16]},
            }
        )
    )
    # No target spacing and no fingerprint: a readable error, exit 1.
    assert main(["data", "preprocess", str(site), "--config", str(cfg)]) == 1
    assert "fedmed data check" in capsys.readouterr().err
    write_stub_fingerprint(site, [2.0, 2.0, 2.5])
    cache = tmp_path / "cache"
    args = ["data", "preprocess", str(site), "--config", str(cfg), "--cache-dir", str(cache)]
    assert main([*args, "--site", "site-a"]) == 0
    out = capsys.readouterr().out
    assert "preprocessed now: 2" in out and "2 x 2 x 2.5" in out and "RAS" in out
    assert main(args) == 0
    assert "cached already: 2" in capsys.readouterr().out
    assert len([p for p in next(cache.iterdir()).iterdir()]) == 2


def test_unwritable_cache_dir_is_a_readable_error(tmp_path):
    case = small_case(tmp_path / "site")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    with pytest.raises(PreprocessingError, match="--cache-dir"):
        CaseCache(blocker, settings()).get(case)


def test_cache_key_covers_the_pipeline_version(tmp_path, monkeypatch):
    """A pipeline whose output changed (a new PIPELINE_VERSION) never serves old entries."""
    case = small_case(tmp_path / "site")
    s = settings()
    old = CaseCache(tmp_path / "cache", s)
    old.get(case)
    monkeypatch.setattr(cache_mod, "PIPELINE_VERSION", cache_mod.PIPELINE_VERSION + 1)
    assert settings_key(s) != old.root.name
    new = CaseCache(tmp_path / "cache", s)
    assert not new.contains(case)
    entry = next(old.root.iterdir())  # the entry stored under the old version's key
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["settings"]["version"] == cache_mod.PIPELINE_VERSION - 1
    assert meta["settings"]["target_spacing"] == [2.0, 2.0, 2.0]

