"""The two non-federated baselines: centralized (pooled data) and local-only (one site).

Both are the same function: pool the training splits of some sites, train with the shared
:class:`~fedmed.training.trainer.LocalTrainer`, evaluate everywhere, write a run directory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmed.config import FederationConfig
from fedmed.errors import TrainingError
from fedmed.export.tracking import RunTracker, open_tracker
from fedmed.federation.rundir import RunDir
from fedmed.training.evaluation import evaluate_everywhere


def run_pooled(
    cfg: FederationConfig,
    out: Path,
    *,
    sites: Sequence[str] | None = None,
    mode: str = "centralized",
    epochs: int | None = None,
    force: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train on the pooled training cases of ``sites`` and write the run directory.

    Args:
        cfg: the federation config.
        out: the run directory.
        sites: the sites whose training cases are pooled; default all (centralized).
        mode: ``centralized`` or ``local`` (written into ``summary.json``).
        epochs: passes over the pooled cases; default ``cfg.training.epochs``.
        force: replace an existing run directory.
        console: where progress and the model summary go.

    Returns:
        The summary written to ``summary.json``.
    """
    from fedmed.data.dataset import SiteSplit, load_site_cases
    from fedmed.data.planning import plan_preprocessing
    from fedmed.models import build_model, describe_model
    from fedmed.training.checkpoint import save_model
    from fedmed.training.trainer import LocalTrainer, seed_everything

    console = console or Console()
    started = time.perf_counter()
    names = list(sites) if sites is not None else cfg.site_names
    for n in names:
        cfg.site(n)  # raises ConfigError for an unknown site
    settings = plan_preprocessing(cfg)  # before the run directory: a planning error leaves none
    run = RunDir.create(out, cfg, force=force)
    if cfg.preprocessing.target_spacing is None:
        planned = " x ".join(f"{s:g}" for s in settings.target_spacing)
        console.print(f"target spacing planned from the sites' fingerprints: {planned} mm")
    cases = []
    for n in names:
        cases.extend(load_site_cases(cfg, n, "train", fixed=SiteSplit.simulated(cfg, n)))
    if not cases:
        raise TrainingError(f"sites {names} have no training cases")
    seed_everything(cfg.training.seed)
    model = build_model(cfg.model, cfg.modalities, cfg.num_classes)
    console.print(f"[bold]{mode}[/] on {len(cases)} training cases from {', '.join(names)}")
    console.print(
        f"model: {describe_model(model, len(cfg.modalities), cfg.preprocessing.patch_size)}"
    )
    tracker = _tracker(cfg, run, mode, console)
    trainer = LocalTrainer(
        cfg, model, metrics_path=run.metrics_path, site=names[0] if mode == "local" else None,
        state_dir=run.path / "state",
        on_epoch=lambda line: tracker.log_line(line, step=int(line["epoch"])),
    )
    n_epochs = epochs or cfg.training.epochs
    fit = trainer.fit(cases, n_epochs)
    train_seconds = time.perf_counter() - started
    results = evaluate_everywhere(trainer, cfg)
    save_model(run.model_path, trainer.get_weights(), cfg, settings.target_spacing)
    summary = {
        "mode": mode,
        **results,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_seconds": round(train_seconds, 2),
        "train_cases": len(cases),
        "epochs": n_epochs,
        "sites": names,
        "final_train_loss": fit.loss,
        "device": str(trainer.device),
        "target_spacing": list(settings.target_spacing),
    }
    if fit.epsilon is not None:
        summary["epsilon"] = {names[0]: fit.epsilon}
        summary["delta"] = fit.delta
    written = run.write_summary(summary)
    tracker.finish(written, step=n_epochs)
    return written


def _tracker(cfg: FederationConfig, run: RunDir, mode: str, console: Console) -> RunTracker:
    """TensorBoard / MLflow per ``cfg.tracking``; its notes go to the console."""
    return open_tracker(
        cfg, run.path, mode=mode,
        note=lambda text: console.print(text, markup=False, highlight=False, style="yellow"),
    )
