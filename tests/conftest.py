"""Shared fixtures: tiny real NIfTI volumes and small sites in each supported layout.

Everything is written with nibabel directly (not through ``fedmed.data.io``) so that the
I/O tests have an independent writer. Volumes are 16^3 to 24^3 so a whole site is written in
a fraction of a second.

Fixtures (all return plain functions):

* ``tiny_volume(shape, seed, channels)`` -> ``(image (C, X, Y, Z) float32, label (X, Y, Z)
  uint8)``: a bright ellipsoid of "tissue" with a small "lesion" sphere, per-modality
  intensities, noise.
* ``make_affine(spacing, axcodes, origin)`` -> 4x4 voxel-to-RAS affine.
* ``write_nifti(path, array, affine)`` -> path (3D, or 4D channels-last for ``(C, X, Y, Z)``).
* ``make_site(root, fmt, n_cases=..., ...)`` -> the site folder, in one of
  :data:`SITE_FORMATS`.
* ``write_federation_config(path, sites, ...)`` -> a federation YAML naming the sites.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

# The machine is shared: tests must not spawn one BLAS thread per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

MODALITIES: tuple[str, ...] = ("T1", "T2", "FLAIR")
LABELS: dict[int, str] = {0: "background", 1: "tissue", 2: "lesion"}
SPACING: tuple[float, float, float] = (1.0, 1.2, 1.5)
SITE_FORMATS: tuple[str, ...] = ("folder", "folder-noyaml", "msd", "msd-split", "nnunet")
"""``folder``: folder per case + site.yaml; ``folder-noyaml``: without site.yaml; ``msd``:
one 4D multichannel file per case; ``msd-split``: MSD with a list of per-modality files;
``nnunet``: nnU-Net v2 raw (``imagesTr/CASE_000X``, ``labelsTr``)."""


def _make_affine(
    spacing: Sequence[float] = SPACING,
    axcodes: str = "RAS",
    origin: Sequence[float] = (-10.0, 5.0, 20.0),
) -> np.ndarray:
    """Voxel-to-RAS affine whose array axes point along ``axcodes`` (e.g. ``"LPS"``)."""
    ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for i, (axis, flip) in enumerate(ornt):
        aff[int(axis), i] = float(flip) * float(spacing[i])
    aff[:3, 3] = origin
    return aff


def _tiny_volume(
    shape: Sequence[int] = (16, 16, 16), seed: int = 0, channels: int = len(MODALITIES)
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, int(s)) for s in shape], indexing="ij")
    tissue = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.75) ** 2 < 1.0
    c = rng.uniform(-0.2, 0.2, size=3)
    lesion = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 0.3**2
    label = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    label[tissue] = 1
    label[lesion & tissue] = 2
    image = np.zeros((channels, *label.shape), dtype=np.float32)
    for ch in range(channels):
        base = np.where(label == 2, 300.0 + 50 * ch, np.where(label == 1, 100.0 + 40 * ch, 0.0))
        noise = rng.normal(0.0, 5.0, size=label.shape)
        image[ch] = np.where(label > 0, base + noise, 0.0).astype(np.float32)
    return image, label


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if arr.ndim == 4:  # (C, X, Y, Z) -> channels last on disk
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    img = nib.Nifti1Image(arr, _make_affine() if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def _make_site(
    root: Path,
    fmt: str = "folder",
    n_cases: int = 4,
    shape: Sequence[int] = (16, 16, 16),
    modalities: Sequence[str] = MODALITIES,
    labels: dict[int, str] | None = None,
    spacing: Sequence[float] = SPACING,
    name: str | None = None,
    vary_shape: bool = True,
) -> Path:
    """Write a valid site of ``n_cases`` tiny cases in layout ``fmt``.

    Case ids are ``case_000``, ``case_001``, ... (nnU-Net: ``FED_000``, ...). Shapes vary
    by up to 2 voxels per axis between cases when ``vary_shape`` (real sites are not uniform).
    """
    if fmt not in SITE_FORMATS:
        raise ValueError(f"fmt must be one of {SITE_FORMATS}, got {fmt!r}")
    labels = dict(LABELS if labels is None else labels)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    affine = _make_affine(spacing)
    training: list[dict[str, object]] = []
    for i in range(n_cases):
        shp = tuple(int(s) + (i % 3 if vary_shape else 0) for s in shape)
        image, label = _tiny_volume(shp, seed=i, channels=len(modalities))
        if fmt in ("folder", "folder-noyaml"):
            cdir = root / f"case_{i:03d}"
            for c, m in enumerate(modalities):
                _write_nifti(cdir / f"{m}.nii.gz", image[c], affine)
            _write_nifti(cdir / "label.nii.gz", label, affine)
        elif fmt == "msd":
            _write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", image, affine)
            _write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine)
            training.append(
                {
                    "image": f"./imagesTr/case_{i:03d}.nii.gz",
                    "label": f"./labelsTr/case_{i:03d}.nii.gz",
                }
            )
        elif fmt == "msd-split":
            paths = []
            for c, m in enumerate(modalities):
                rel = f"imagesTr/case_{i:03d}_{m}.nii.gz"
                _write_nifti(root / rel, image[c], affine)
                paths.append(rel)
            _write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine)
            training.append(
                {
                    "case_id": f"case_{i:03d}",
                    "image": paths,
                    "label": f"labelsTr/case_{i:03d}.nii.gz",
                }
            )
        else:  # nnunet
            for c in range(len(modalities)):
                _write_nifti(root / "imagesTr" / f"FED_{i:03d}_{c:04d}.nii.gz", image[c], affine)
            _write_nifti(root / "labelsTr" / f"FED_{i:03d}.nii.gz", label, affine)
    if fmt == "folder":
        declared = {"name": name or root.name, "modalities": list(modalities), "labels": labels}
        (root / "site.yaml").write_text(yaml.safe_dump(declared, sort_keys=False))
    elif fmt in ("msd", "msd-split"):
        meta = {
            "name": name or root.name,
            "modality": {str(c): m for c, m in enumerate(modalities)},
            "labels": {str(v): n for v, n in labels.items()},
            "numTraining": n_cases,
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    elif fmt == "nnunet":
        meta = {
            "name": name or root.name,
            "channel_names": {str(c): m for c, m in enumerate(modalities)},
            "labels": {n: v for v, n in labels.items()},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def _write_federation_config(
    path: Path,
    sites: dict[str, Path],
    modalities: Sequence[str] = MODALITIES,
    labels: dict[int, str] | None = None,
    preprocessing: dict[str, object] | None = None,
) -> Path:
    data: dict[str, object] = {
        "name": "test-federation",
        "modalities": list(modalities),
        "labels": dict(LABELS if labels is None else labels),
        "sites": [{"name": n, "path": str(p)} for n, p in sites.items()],
    }
    if preprocessing:
        data["preprocessing"] = preprocessing
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_volume() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``tiny_volume(shape=(16,16,16), seed=0, channels=3)`` -> ``(image, label)``."""
    return _tiny_volume


@pytest.fixture(scope="session")
def make_affine() -> Callable[..., np.ndarray]:
    """``make_affine(spacing=(1, 1.2, 1.5), axcodes="RAS", origin=...)`` -> 4x4 affine."""
    return _make_affine


@pytest.fixture(scope="session")
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, array, affine=None)``: 3D, or ``(C, X, Y, Z)`` as 4D."""
    return _write_nifti


@pytest.fixture(scope="session")
def make_site() -> Callable[..., Path]:
    """``make_site(root, fmt="folder", n_cases=4, shape=(16,16,16), ...)`` -> site folder."""
    return _make_site


@pytest.fixture(scope="session")
def write_federation_config() -> Callable[..., Path]:
    """``write_federation_config(path, {site: dir}, modalities=..., labels=...)`` -> YAML."""
    return _write_federation_config
