"""A tiny trained run folder (model.pt + summary.json) on the toy ball task, and its scans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmed.data.io import Image
from fedmed.data.planning import plan_preprocessing
from fedmed.data.preprocess import preprocess_images
from fedmed.models import build_model
from fedmed.training.checkpoint import save_model
from fedmed.training.trainer import LocalTrainer, seed_everything
from tests.support.toy import CENTRE, ball, intensities, toy_config


def grid(
    axcodes: str,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    rotate_deg: float = 0.0,
) -> np.ndarray:
    """An affine with the given on-disk orientation and spacing, centred on the ball."""
    ornt = nib.orientations.axcodes2ornt(axcodes)
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for i, (axis, flip) in enumerate(ornt):
        aff[int(axis), i] = flip * spacing[i]
    if rotate_deg:
        t = np.deg2rad(rotate_deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = CENTRE - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return aff


def scan(aff: np.ndarray, shape: tuple[int, int, int], seed: int) -> tuple[dict, Image]:
    """T1 and FLAIR images of the ball on a grid, and the true label."""
    rng = np.random.default_rng(seed)
    lab = ball(aff, shape)
    images = {
        "T1": Image(intensities(lab, rng)[None], aff),
        "FLAIR": Image(intensities(lab, rng, 60.0)[None], aff),
    }
    return images, Image(lab[None].astype(np.float32), aff)


def train_toy_run(run: Path, summary: dict[str, Any] | None = None, **sections: Any) -> Path:
    """Train the toy network for a few epochs and write ``run/model.pt`` (+ ``summary.json``).

    Args:
        run: the run folder to create.
        summary: written as ``summary.json`` when given.
        sections: config overrides (``labels``, ``model``, ...), see :func:`toy_config`.
    """
    run.mkdir(parents=True, exist_ok=True)
    cfg = toy_config(run, training={"epochs": 8, **sections.pop("training", {})}, **sections)
    settings = plan_preprocessing(cfg)
    cases = []
    for i in range(4):
        shift = np.random.default_rng(i).uniform(-6, 6, 3)
        aff = grid("RAS", (2.0, 2.0, 2.0), (28, 28, 28))
        aff[:3, 3] += shift
        images, label = scan(aff, (28, 28, 28), seed=i)
        cases.append(preprocess_images(images, settings, label, case_id=f"c{i}"))
    seed_everything(0)
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    trainer = LocalTrainer(cfg, model, device="cpu")
    trainer.fit(cases, epochs=cfg.training.epochs)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return save_model(run / "model.pt", trainer.get_weights(), cfg, settings.target_spacing)
