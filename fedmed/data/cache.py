"""The on-disk cache of preprocessed cases and the site-wide preprocessing run.

:class:`CaseCache` stores one folder per case under ``cache_dir / settings_key(settings)``:
the arrays as ``.npy`` (memory-mapped on load, so later epochs and rounds never re-read
NIfTI) and a small ``meta.json``. Entries are written to a temporary folder and renamed into
place, so a killed process never leaves a half-written entry. :func:`preprocess_site` fills
the cache for every case of a site (``fedmed data preprocess``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.formats import Case, SiteManifest
from fedmed.data.planning import PreprocessSettings
from fedmed.data.preprocess import PIPELINE_VERSION, PreprocessedCase, label_path, preprocess_case
from fedmed.errors import ImageReadError, PreprocessingError

DEFAULT_CACHE_NAME = ".fedmed-cache"
_TMP_PREFIX = ".tmp-"


def settings_record(settings: PreprocessSettings) -> dict[str, Any]:
    """What a cache entry records of its settings: the pipeline version and the settings."""
    return {"version": PIPELINE_VERSION, **settings.as_dict()}


def settings_key(settings: PreprocessSettings) -> str:
    """The part of the cache key that depends on the settings (16 hex digits).

    Covers :data:`~fedmed.data.preprocess.PIPELINE_VERSION`, so a pipeline whose output
    changed never serves an old entry.
    """
    blob = json.dumps(settings_record(settings), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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

    Layout: ``cache_dir / settings_key(settings) / <case>-<paths hash>-<source hash>/`` holding
    ``image.npy``, ``label.npy`` (labelled cases) and ``meta.json``. The source hash covers
    each file's absolute path, size and mtime (ns): a changed file or changed settings is a
    miss, and the stale entry of the same case is removed when the new one is stored.

    Attributes:
        root: ``cache_dir / settings_key(settings)``.
        hits: entries served from disk since creation.
        misses: entries computed since creation.
    """

    def __init__(self, cache_dir: str | Path, settings: PreprocessSettings) -> None:
        self.settings = settings
        self.root = Path(cache_dir).absolute() / settings_key(settings)
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
        label_file = label_path(case)
        sources: dict[str, Any] = {
            "case_id": case.case_id,
            "images": {
                m: _file_stat(mf.path) + [mf.channel]
                for m, mf in sorted(case.images.items())
                if m in self.settings.modalities
            },
            "label": None if label_file is None else _file_stat(label_file),
            "settings": settings_key(self.settings),
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
                "settings": settings_record(self.settings),
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
