"""A tiny federation of real NIfTI blobs (T1 only), written for the federation tests.

``make_federation(root, **sections)`` writes, per site, ``cases`` 24^3 cases (a bright
ball on noise; sites differ by an intensity shift), two central test cases and a
``federation.yaml`` (three sites and secure aggregation on by default); ``sections``
update the config's sections (e.g. ``secure_aggregation={"enabled": False}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

SHAPE = (24, 24, 24)
SITES = ("a", "b", "c")


def _write_case(folder: Path, rng: np.random.Generator, shift: float) -> None:
    folder.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = rng.uniform(9, 15, size=3)[:, None, None, None]
    label = (np.sqrt(((grid - centre) ** 2).sum(0)) < rng.uniform(4, 6)).astype(np.uint8)
    image = (rng.normal(1.0 + shift, 0.3, SHAPE) + 2.0 * label).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "T1.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "label.nii.gz")


def make_federation(
    root: Path,
    *,
    sites: Sequence[str] = SITES,
    cases: int = 4,
    case_id: str = "case{i:02d}",
    shift_step: float = 0.25,
    secure: bool = True,
    **sections: Any,
) -> Path:
    """Write the sites (``site-<name>``), the central test set and ``federation.yaml``.

    Args:
        root: the folder to write into.
        sites: site names.
        cases: cases per site.
        case_id: the case folders' name pattern (``{i}`` is the index).
        shift_step: site ``k``'s intensities are shifted by ``k * shift_step``.
        secure: secure aggregation on.
        **sections: config sections to update.
    """
    rng = np.random.default_rng(0)
    for k, site in enumerate(sites):
        for i in range(cases):
            _write_case(root / f"site-{site}" / case_id.format(i=i), rng, shift_step * k)
    for i in range(2):
        _write_case(root / "central" / f"test{i:02d}", rng, 0.25)
    cfg: dict[str, Any] = {
        "name": "tiny-secagg",
        "modalities": ["T1"],
        "labels": {0: "background", 1: "blob"},
        "sites": [{"name": s, "path": f"site-{s}"} for s in sites],
        "central_test": "central",
        "preprocessing": {
            "target_spacing": [2.0, 2.0, 2.0], "patch_size": [16, 16, 16],
            "patches_per_case": 1, "augment": False, "cache_dir": "cache",
        },
        "model": {"channels": [4, 8, 16], "num_res_units": 0},
        "training": {"batch_size": 2, "amp": False, "progress": False, "sw_batch_size": 4,
                     "device": "cpu"},
        "federation": {
            "rounds": 1, "local_epochs": 1, "min_train_sites": 2, "min_available_sites": 3,
            "client_resources": {"num_cpus": 1, "num_gpus": 0}, "max_parallel_sites": 1,
            "round_timeout_s": 120, "evaluate_sites": False,
        },
        "secure_aggregation": {"enabled": secure, "clipping_range": 4.0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
