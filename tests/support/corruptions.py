"""Helpers of the `fedmed data check` tests: corrupt a copy of a valid site, run the check."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmed.cli.main import main

MODALITIES = ("T1", "T2", "FLAIR")


def truncate(path: Path) -> None:
    """Cut a file in half (a broken copy)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], affine_fn: Any = None) -> None:
    """Load a NIfTI, transform its data (and optionally its affine), save it in place."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    aff = img.affine.copy() if affine_fn is None else affine_fn(img.affine.copy())
    new = nib.Nifti1Image(fn(data), aff)
    new.set_qform(aff, code=1)
    new.set_sform(aff, code=1)
    nib.save(new, str(path))


def with_nan(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 with one NaN voxel."""
    out = a.astype(np.float32)
    out[2, 3, 4] = np.nan
    return out


def shift_5mm(aff: np.ndarray) -> np.ndarray:
    """The affine moved 5 mm in world space."""
    aff[:3, 3] += np.array([3.0, 4.0, 0.0])  # |(3, 4, 0)| = 5 mm
    return aff


def run_check(site: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """``fedmed data check SITE --json``: the exit code and the JSON report."""
    out = tmp_path / "report.json"
    rc = main(["data", "check", str(site), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def cases_by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's cases by id."""
    return {c["case_id"]: c for c in report["cases"]}


def error_kinds(case: dict[str, Any]) -> set[str]:
    """The kinds of a reported case's error-level problems."""
    return {p["kind"] for p in case["problems"] if p["severity"] == "error"}


def copy_site(src: Path, dst: Path) -> Path:
    """A copy of a site folder, to corrupt."""
    shutil.copytree(src, dst)
    return dst
