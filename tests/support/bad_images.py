"""Bad image files for the safe-loading tests: each helper writes one kind of bad input.

Written with nibabel directly (not through :mod:`fedmed.data.io`), so the reader under
test never wrote what it is given. Every helper returns the path it wrote.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.diag([1.0, 1.2, 1.5, 1.0]) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def volume(shape: tuple[int, ...] = (16, 16, 16), seed: int = 0) -> np.ndarray:
    """A float32 volume of positive, non-constant intensities."""
    return (np.random.default_rng(seed).random(shape) * 100 + 1).astype(np.float32)


def with_value(path: Path, value: float, shape: tuple[int, ...] = (16, 16, 16)) -> Path:
    """A volume with one voxel set to ``value`` (NaN, +inf, -inf)."""
    data = volume(shape)
    data[3, 4, 5] = value
    return _save(path, data)


def huge_header(path: Path, shape: tuple[int, ...] = (4000, 4000, 4000)) -> Path:
    """A tiny ``.nii.gz`` whose header claims ``shape`` float32 voxels (4000^3: 256 GB)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_qform(np.eye(4), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)  # header, extension flag, a bit
    return path


def with_sform(path: Path, sform: np.ndarray, shape: tuple[int, ...] = (16, 16, 16)) -> Path:
    """A volume whose only geometry is ``sform`` (qform code 0): e.g. all zeros, NaN."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(sform, code=1)
    hdr.set_qform(None, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume(shape), None, header=hdr), str(path))
    return path


def zero_affine(path: Path) -> Path:
    """All-zero (singular) affine."""
    return with_sform(path, np.zeros((4, 4)))


def nan_affine(path: Path) -> Path:
    """An affine with a NaN entry."""
    aff = np.diag([1.0, 1.2, 1.5, 1.0])
    aff[0, 0] = np.nan
    return with_sform(path, aff)


def parallel_axes(path: Path) -> Path:
    """Two array axes along the same world direction: a grid of no volume."""
    aff = np.eye(4)
    aff[:3, :3] = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    return with_sform(path, aff)


def of_shape(path: Path, shape: tuple[int, ...], dtype: Any = np.float32) -> Path:
    """A volume of any shape and dtype (2D, 5D, complex ...)."""
    return _save(path, volume(shape).astype(dtype))


def truncated(path: Path) -> Path:
    """A valid ``.nii.gz`` cut in half (a broken copy)."""
    _save(path, volume())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def text_file(path: Path) -> Path:
    """A radiology report saved under an image name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("Findings: no acute abnormality.\n" * 20)
    return path


def fractional_label(path: Path, shape: tuple[int, ...] = (16, 16, 16)) -> Path:
    """A label map of interpolated (non-integer) values."""
    lab = np.zeros(shape, np.float32)
    lab[4:12, 4:12, 4:12] = 1.0
    lab[6:10, 6:10, 6:10] = 1.5
    return _save(path, lab)


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: what a malicious model file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


def code_running_pickle(path: Path, marker: Path, torch_zip: bool = False) -> Path:
    """A ``model.pt`` whose unpickling would create ``marker`` (it must never exist).

    Args:
        path: the file to write.
        marker: the file the payload's code would create.
        torch_zip: written with ``torch.save`` (zip container) instead of a plain pickle.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "fedmed-model/1", "weights": {}, "hook": _RunsCode(marker)}
    if torch_zip:
        import torch

        torch.save(payload, path)
        return path
    with path.open("wb") as f:
        pickle.dump(payload, f)
    return path
