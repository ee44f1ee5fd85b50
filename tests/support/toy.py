"""A tiny, trivially learnable segmentation task shared by the trainer and predict tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import FederationConfig, config_from_dict
from fedmed.data.preprocess import PreprocessedCase

CENTRE = np.array([4.0, -6.0, 10.0])
RADIUS_MM = 14.0


def toy_config(tmp: Path, **sections: Any) -> FederationConfig:
    base: dict[str, Any] = {
        "modalities": ["T1", "FLAIR"],
        "labels": {0: "background", 1: "ball"},
        "sites": [{"name": "a", "path": "a"}],
        "preprocessing": {
            "target_spacing": [2.0, 2.0, 2.0],
            "patch_size": [16, 16, 16],
            "patches_per_case": 2,
            "augment": False,
        },
        "model": {"channels": [4, 8, 16], "num_res_units": 0},
        "training": {
            "epochs": 3,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "progress": False,
            "sw_batch_size": 4,
            "schedule": "constant",
        },
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base, root=tmp)


def ball(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Label 1 inside a ball of radius RADIUS_MM around CENTRE (world mm), on any grid."""
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).T
    inside = np.linalg.norm(world - CENTRE, axis=1) <= RADIUS_MM
    return inside.reshape(shape).astype(np.uint8)


def intensities(label: np.ndarray, rng: np.random.Generator, bright: float = 100.0) -> np.ndarray:
    return (10.0 + bright * label + rng.normal(0, 3.0, label.shape)).astype(np.float32)


def toy_cases(n: int, seed: int = 0, flair: bool = True) -> list[PreprocessedCase]:
    """Preprocessed-like cases (RAS, 2 mm) with the ball shifted a little per case."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        aff[:3, 3] = CENTRE - 2.0 * 12 + rng.uniform(-4, 4, 3)
        lab = ball(aff, (24, 24, 24))
        t1 = intensities(lab, rng)
        fl = intensities(lab, rng, 60.0) if flair else np.zeros_like(t1)
        img = np.stack([(t1 - t1.mean()) / t1.std(), (fl - fl.mean()) / (fl.std() or 1.0)])
        if not flair:
            img[1] = 0.0
        out.append(
            PreprocessedCase(
                case_id=f"toy{i}",
                image=img.astype(np.float32),
                label=lab[None],
                available=np.array([True, flair]),
                affine=aff,
            )
        )
    return out
