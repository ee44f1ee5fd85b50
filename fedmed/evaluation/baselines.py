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
from fedmed.evaluation.evaluate import evaluate_everywhere
from fedmed.federation.rundir import RunDir


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
    from fedmed.data.dataset import load_site_cases
    from fedmed.data.preprocess import PreprocessSettings
    from fedmed.models import build_model, describe_model
    from fedmed.training.checkpoint import save_model
    from fedmed.training.trainer import LocalTrainer, seed_everything

    console = console or Console()
    started = time.perf_counter()
    names = list(sites) if sites is not None else cfg.site_names
    for n in names:
        cfg.site(n)  # raises ConfigError for an unknown site
    run = RunDir.create(out, cfg, force=force)
    settings = PreprocessSettings.from_config(cfg)
    cases = []
    for n in names:
        cases.extend(load_site_cases(cfg, n, "train"))
    if not cases:
        raise TrainingError(f"sites {names} have no training cases")
    seed_everything(cfg.training.seed)
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    console.print(f"[bold]{mode}[/] on {len(cases)} training cases from {', '.join(names)}")
    console.print(
        f"model: {describe_model(model, len(cfg.modalities), cfg.preprocessing.patch_size)}"
    )
    trainer = LocalTrainer(
        cfg,
        model,
        metrics_path=run.metrics_path,
        site=names[0] if mode == "local" else None,
        state_dir=run.path / "state",
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
    }
    if fit.epsilon is not None:
        summary["epsilon"] = {names[0]: fit.epsilon}
        summary["delta"] = fit.delta
    return run.write_summary(summary)
