"""Framework overhead: ``LocalTrainer.fit`` against a bare MONAI training loop.

Both train the same network (``fedmed.models.build_model``: U-Net (8, 16, 32, 64), 1
residual unit, 3 modalities, 5 classes, 32^3 patches, batch 2) with AdamW and MONAI's
``DiceCELoss`` on the same in-memory cases (4 generated cases at 2.75 mm, ~50x60x50),
starting from the same weights. The bare loop draws its batches from the same
``PatchDataset`` with the same seed through the same ``DataLoader`` arguments, so both
see identical patches, in the same order, for the same number of optimiser steps; it does
nothing else (no LR schedule, no loss bookkeeping, no progress bar, no metric lines).

Repeats alternate (fedmed, bare, bare, fedmed, ...) to cancel drift on a shared machine; the
figure is the ratio of the summed times, as throughput fedmed / bare.

Figures:

* ``throughput_fedmed_over_bare``: with ``training.progress: false`` (what federated sites
  and the benchmarks use). Target >= 0.95 (overhead <= 5%).
* ``throughput_progress_over_bare``: the same with the progress bar on (the default of
  ``fedmed centralized/local`` at a terminal). Informational.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks import _fixtures as fx
from benchmarks.common import Figure

NAME = "trainer"


def _bare_fit(cfg: Any, model: Any, cases: list[Any], epochs: int, seed: int) -> int:
    """The plain MONAI/PyTorch loop over the trainer's own patches; returns steps taken."""
    import torch
    from monai.losses import DiceCELoss

    from fedmed.data.dataset import PatchDataset

    t = cfg.training
    dataset = PatchDataset(cases, cfg.preprocessing, cfg.num_classes, seed=seed, train=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed), num_workers=0,
        drop_last=len(dataset) >= t.batch_size,
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    model.train()
    steps = 0
    for e in range(epochs):
        dataset.set_epoch(e)
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            logits = model(batch["image"], batch["available"])
            loss = loss_fn(logits, batch["label"])
            loss.backward()
            opt.step()
            steps += 1
    return steps


def run(quick: bool = False) -> list[Figure]:
    """Alternating repeats; ``quick``: smaller network and patches, fewer steps."""
    import torch

    from fedmed.data.dataset import load_site_cases
    from fedmed.models import build_model
    from fedmed.training.trainer import LocalTrainer

    torch.set_num_threads(1)  # the machine is shared; both loops get the same single core
    channels = (4, 8, 16) if quick else (8, 16, 32, 64)
    patch = 16 if quick else 32
    spacing = 5.5 if quick else 2.75
    repeats = 2 if quick else 6
    epochs = 1 if quick else 5
    yaml_path = fx.synth_federation(4, 2, test_cases=1)
    cfg = fx.small_config(
        yaml_path, sites=1, channels=channels, num_res_units=0 if quick else 1, patch=patch,
        target_spacing=spacing, patches_per_case=2 if quick else 3,
    )
    cases = load_site_cases(cfg, cfg.site_names[0], "all")
    # Memory-mapped cache -> plain arrays: both loops read from RAM.
    cases = [type(c)(c.case_id, c.image.copy(), c.label.copy(), c.available, c.affine)
             for c in cases]
    init = build_model(cfg.model, len(cfg.modalities), cfg.num_classes).state_dict()
    seed = 0

    def fresh() -> Any:
        m = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
        m.load_state_dict(init)
        return m

    def fedmed(progress: bool) -> tuple[float, int]:
        c = cfg.with_changes(training={"progress": progress, "schedule": "constant"})
        trainer = LocalTrainer(c, fresh(), device="cpu")
        t0 = time.perf_counter()
        res = trainer.fit(cases, epochs, seed=seed)
        return time.perf_counter() - t0, res.steps

    def bare() -> tuple[float, int]:
        model = fresh()
        t0 = time.perf_counter()
        steps = _bare_fit(cfg, model, cases, epochs, seed)
        return time.perf_counter() - t0, steps

    # One untimed pass each: allocator and MONAI warm-up.
    fedmed(False)
    bare()
    totals = {"fedmed": 0.0, "progress": 0.0, "bare": 0.0}
    steps: dict[str, int] = {}
    for i in range(repeats):
        order = ("fedmed", "progress", "bare") if i % 2 == 0 else ("bare", "progress", "fedmed")
        for who in order:
            secs, n = bare() if who == "bare" else fedmed(who == "progress")
            totals[who] += secs
            steps[who] = n
    if len(set(steps.values())) != 1:
        raise RuntimeError(f"the loops took different numbers of steps: {steps}")
    n_steps = steps["bare"] * repeats
    plain = totals["bare"] / totals["fedmed"]
    with_bar = totals["bare"] / totals["progress"]
    setup = (
        f"U-Net {list(channels)}, {patch}^3 patches, batch 2, {len(cases)} in-memory cases, "
        f"{steps['bare']} steps x {repeats} alternating repeats, 1 thread; "
        f"fedmed {totals['fedmed']:.2f} s, with progress bar {totals['progress']:.2f} s, "
        f"bare loop {totals['bare']:.2f} s ({totals['bare'] / n_steps * 1e3:.0f} ms/step)"
    )
    extra = {"seconds": totals, "steps_per_repeat": steps["bare"], "repeats": repeats}
    return [
        Figure(NAME, "throughput_fedmed_over_bare", plain, "x", ">= 0.95", plain >= 0.95,
               f"training.progress false; {setup}", extra),
        Figure(NAME, "throughput_progress_over_bare", with_bar, "x", "(reported)", None,
               f"training.progress true (rich progress bar); {setup}", extra),
    ]


if __name__ == "__main__":
    for f in run(quick="--quick" in sys.argv):
        print(f"{f.name}: {f.value:.4g} {f.unit} (target {f.target}, met {f.met}) -- {f.detail}")
