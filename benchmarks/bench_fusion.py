"""Intermediate fusion with a site that lacks FLAIR (issue: models and trainer).

The intermediate-fusion network is trained on the default generated federation, where
hospital-b acquires no FLAIR. Its Dice on hospital-b's own test cases (no FLAIR, as on
disk) is compared with the same network given all modalities: the same subjects are
simulated again from their recorded seeds with hospital-b's scanner acquiring FLAIR too,
so only the FLAIR channel differs. Target: within 0.05.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from benchmarks.common import Figure

MISSING = "FLAIR"
SITE = "hospital-b"


def run(quick: bool = False) -> list[Figure]:
    import numpy as np

    from benchmarks._fixtures import synth_federation
    from fedmed.config import load_config
    from fedmed.data.dataset import load_site_cases
    from fedmed.data.preprocess import PreprocessSettings, preprocess_images
    from fedmed.data.synth import default_scanners, simulate_subject
    from fedmed.evaluation.baselines import run_pooled
    from fedmed.training.checkpoint import load_model
    from fedmed.training.trainer import LocalTrainer

    fed = synth_federation(
        4, 4 if quick else 10, test_cases=2 if quick else 8, scale=2.0 if quick else 1.0
    )
    base = load_config(fed)
    changes = {"architecture": "fusion", "modality_dropout": 0.25}
    if quick:
        changes["channels"] = (8, 16, 32)
    cfg = base.with_changes(
        model=changes,
        training={"epochs": 2 if quick else base.training.epochs, "progress": False},
    )
    out = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    run_pooled(cfg, out / "run", force=True)
    loaded = load_model(out / "run" / "model.pt")
    trainer = LocalTrainer(loaded.cfg, loaded.model, device="cpu")

    without = load_site_cases(cfg, SITE, "test")
    seeds = {
        c["case_id"]: c["seed"]
        for c in json.loads((fed.parent / "synth.json").read_text())["cases"]
    }
    scanner = next(s for s in default_scanners(len(cfg.sites)) if s.name == SITE)
    full_scanner = dataclasses.replace(scanner, modalities=tuple(cfg.modalities))
    settings = PreprocessSettings.from_config(cfg)
    with_all = []
    for case in without:
        subject = simulate_subject(seeds[case.case_id], full_scanner, reference_spacing=None)
        with_all.append(
            preprocess_images(subject.images, settings, subject.label, case_id=case.case_id)
        )
    flair = list(cfg.modalities).index(MISSING)
    assert not any(c.available[flair] for c in without)  # the site really lacks it
    d_without = trainer.evaluate(without, hd95=False)
    d_with = trainer.evaluate(with_all, hd95=False)
    gap = abs(d_with.dice_mean - d_without.dice_mean)
    detail = (
        f"{len(without)} {SITE} test cases; fusion net trained {cfg.training.epochs} epochs on "
        f"the pooled default federation; Dice per class without {MISSING} "
        + ", ".join(f"{k} {v:.3f}" for k, v in d_without.dice_per_class.items())
        + "; with: "
        + ", ".join(f"{k} {v:.3f}" for k, v in d_with.dice_per_class.items())
    )
    return [
        Figure(
            "fusion",
            "dice_without_flair",
            float(d_without.dice_mean),
            "Dice",
            "reported",
            None,
            detail,
        ),
        Figure(
            "fusion",
            "dice_with_all_modalities",
            float(d_with.dice_mean),
            "Dice",
            "reported",
            None,
            "same subjects simulated again with FLAIR acquired",
        ),
        Figure(
            "fusion",
            "dice_gap_missing_flair",
            float(gap),
            "Dice",
            "<= 0.05",
            bool(gap <= 0.05) and bool(np.isfinite(gap)),
            detail,
        ),
    ]
