"""``fedmed compare``: centralized vs local-only vs federated, under matched compute.

The compute rule: every approach gets the same number of training passes over the pooled
training data. Centralized trains ``E`` epochs on all cases; each site alone trains ``E``
epochs on its own cases (together: ``E`` passes over the pool); each federated strategy runs
``R`` rounds of ``L`` local epochs with ``R x L = E``. All are evaluated on the same central
test set, the same per-site test cases and the same unseen-scanner sites.

Each approach is an *arm* with its own run folder inside the comparison folder. An arm
whose config, data and fedmed version are unchanged since it last finished there is reused,
not retrained (:mod:`fedmed.evaluation.reuse`), so adding a strategy to a comparison costs
only that strategy; ``rerun=True`` retrains every requested arm. Arms not requested this
time stay on disk but are not in the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmed.config import FederationConfig
from fedmed.errors import ConfigError
from fedmed.evaluation.console import wide
from fedmed.evaluation.dp_outlook import dp_outlook, print_outlook
from fedmed.evaluation.reuse import ArmKey, data_fingerprint, prepare_folder, why_not_reusable
from fedmed.export.tracking import shared_mlflow_store

DEFAULT_STRATEGIES = ("fedavg", "fedprox", "fedbn")
REUSED_NOTE = "(unchanged config, data and fedmed version)"
KEPT = ("epsilon", "sites_refused", "sites_refused_final", "per_site_final")
"""Summary keys copied into ``comparison.json`` when a run has them."""


def matched_rounds(cfg: FederationConfig) -> tuple[int, int]:
    """``(rounds, local_epochs)`` with ``rounds x local_epochs = training.epochs``.

    Raises:
        ConfigError: ``training.epochs`` is not a multiple of ``federation.local_epochs``.
    """
    e, local = cfg.training.epochs, cfg.federation.local_epochs
    if e % local:
        raise ConfigError(
            f"matched compute needs training.epochs ({e}) to be a multiple of "
            f"federation.local_epochs ({local}); change one of them"
        )
    return e // local, local


@dataclass(frozen=True)
class Arm:
    """One approach of a comparison.

    Attributes:
        name: its key in ``comparison.json`` (``centralized``, the site of a local-only
            arm, the federated run's name such as ``fedavg`` or ``fedavg-dp``).
        kind: ``centralized``, ``local`` or ``federated``.
        folder: its run folder inside the comparison folder.
        cfg: the config it trains with (matched compute, DP for the DP arm).
        arguments: what else decides its result (sites pooled, strategy, epochs).
    """

    name: str
    kind: str
    folder: str
    cfg: FederationConfig
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Its row in the report: ``centralized``, ``local-only SITE``, ``federated NAME``."""
        return {"centralized": "centralized", "local": f"local-only {self.name}",
                "federated": f"federated {self.name}"}[self.kind]


def plan_arms(
    cfg: FederationConfig, strategies: Sequence[str], dp: bool, rounds: int, local_epochs: int
) -> list[Arm]:
    """Every arm of the comparison, in the order they run."""
    epochs = cfg.training.epochs
    arms = [Arm("centralized", "centralized", "centralized", cfg,
                {"sites": cfg.site_names, "epochs": epochs})]
    arms += [Arm(s, "local", f"local-{s}", cfg, {"sites": [s], "epochs": epochs})
             for s in cfg.site_names]
    fed_cfg = cfg.with_changes(federation={"rounds": rounds, "local_epochs": local_epochs})
    runs = [(s, s, fed_cfg) for s in strategies]
    if dp:
        runs.append(("fedavg-dp", "fedavg", fed_cfg.with_changes(privacy={"enabled": True})))
    arms += [Arm(name, "federated", f"federated-{name}", run_cfg,
                 {"strategy": strategy, "rounds": rounds, "local_epochs": local_epochs,
                  "dp": name.endswith("-dp")})
             for name, strategy, run_cfg in runs]
    return arms


def _train(arm: Arm, run: Path, console: Console) -> dict[str, Any]:
    from fedmed.evaluation.baselines import run_pooled
    from fedmed.federation.simulation import run_federated

    if arm.kind == "federated":
        return run_federated(arm.cfg, run, strategy=arm.arguments["strategy"], force=True)
    sites = None if arm.kind == "centralized" else arm.arguments["sites"]
    return run_pooled(arm.cfg, run, sites=sites, mode=arm.kind, force=True, console=console)


def run_arm(
    arm: Arm, out: Path, data: dict[str, Any], *, rerun: bool, console: Console
) -> tuple[dict[str, Any], bool]:
    """Reuse the arm's finished run when nothing it depends on changed, else train it.

    Returns:
        ``(summary, reused)``.
    """
    key = ArmKey.of(arm.folder, arm.kind, arm.cfg, arm.arguments, data)
    run = out / arm.folder
    why = why_not_reusable(run, key)
    if why is None and not rerun:
        from fedmed.federation.rundir import RunDir

        console.print(f"reused {arm.label} {REUSED_NOTE}", highlight=False)
        return RunDir(run).read_summary(), True
    console.rule(arm.label + (" (all data pooled)" if arm.kind == "centralized" else ""))
    if why != "not run yet":
        console.print(f"training {arm.label} again: {why or '--rerun'}", highlight=False)
    summary = _train(arm, run, console)
    key.write(run)
    return summary, False


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """An arm's figures for ``comparison.json`` (per-site aggregates; no per-case values)."""
    keys = ("dice_mean", "dice_per_class", "hd95_mean", "unseen", "wall_seconds")
    per_site = {s: {k: v for k, v in (m or {}).items() if k != "per_case"}
                for s, m in (summary.get("per_site") or {}).items()}
    return {k: summary.get(k) for k in keys} | {"per_site": per_site} | {
        k: summary[k] for k in KEPT if k in summary
    }


def assemble(
    cfg: FederationConfig, arms: list[Arm], summaries: dict[str, dict[str, Any]],
    rounds: int, local_epochs: int,
) -> dict[str, Any]:
    """``comparison.json``'s figures from the arms' summaries (keyed by run folder)."""
    from fedmed.evaluation.verdict import per_site_verdicts, verdict_basis

    e = cfg.training.epochs
    by_kind = {k: [a for a in arms if a.kind == k] for k in ("local", "federated")}
    result: dict[str, Any] = {
        "compute_rule": (
            f"every approach makes {e} passes over the pooled training data: centralized {e} "
            f"epochs; each site alone {e} epochs on its own cases; federated {rounds} rounds "
            f"x {local_epochs} local epochs"
        ),
        "epochs": e, "rounds": rounds, "local_epochs": local_epochs,
        "centralized": _headline(summaries["centralized"]),
        "local": {a.name: _headline(summaries[a.folder]) for a in by_kind["local"]},
        "federated": {a.name: _headline(summaries[a.folder]) | {
            "strategy": a.arguments["strategy"], "rounds": rounds} for a in by_kind["federated"]},
    }
    locals_ = [v["dice_mean"] for v in result["local"].values() if v["dice_mean"] is not None]
    result["local_mean_dice"] = sum(locals_) / len(locals_) if locals_ else None
    central = result["centralized"]["dice_mean"]
    result["ratio_federated_to_centralized"] = {
        name: (r["dice_mean"] / central if central and r["dice_mean"] is not None else None)
        for name, r in result["federated"].items()
    }
    plain = {a.name: summaries[a.folder] for a in by_kind["federated"]
             if not a.arguments["dp"]}
    result["per_site_verdict"] = per_site_verdicts(
        cfg.site_names, {a.name: summaries[a.folder] for a in by_kind["local"]}, plain,
        verdict_basis(list(plain)),
    )
    return result


def _outlook(arms: list[Arm], console: Console) -> dict[str, Any] | None:
    """The DP outlook of the first federated arm under DP, printed before any training."""
    for arm in arms:
        if arm.kind == "federated":
            outlook = dp_outlook(arm.cfg, arm.arguments["rounds"] * arm.arguments["local_epochs"])
            if outlook is not None:
                print_outlook(outlook, console)
                return outlook
    return None


def run_comparison(
    cfg: FederationConfig,
    out: Path,
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    dp: bool = False,
    force: bool = False,
    rerun: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every approach; write ``comparison.json``, ``report.md`` and figures.

    Args:
        cfg: the federation config.
        out: the comparison folder (one run directory per approach inside). A folder that
            already holds a comparison is written into: unchanged arms are reused.
        strategies: federated strategies to run.
        dp: also run FedAvg with patient-level DP (``privacy`` section, enabled).
        force: write into ``out`` even when it holds files that are not a comparison.
        rerun: retrain every requested arm, even those that could be reused.
        console: progress output.

    Raises:
        ConfigError: unknown strategy, or epochs not a multiple of local epochs.
        FederationError: ``out`` holds other files and ``force`` is not given.
    """
    from fedmed.federation.strategies import STRATEGIES

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")
    console = console or Console()
    rounds, local_epochs = matched_rounds(cfg)
    prepare_folder(out, force=force)
    # each approach: its own RUN/tb (side by side under OUT), one MLflow store for all
    cfg = shared_mlflow_store(cfg, out)
    started = time.perf_counter()
    arms = plan_arms(cfg, strategies, dp, rounds, local_epochs)
    data = data_fingerprint(cfg)
    outlook = _outlook(arms, console)
    summaries: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    for arm in arms:
        summaries[arm.folder], was_reused = run_arm(arm, out, data, rerun=rerun, console=console)
        if was_reused:
            reused.append(arm.label)
    result = assemble(cfg, arms, summaries, rounds, local_epochs)
    result |= {"dp_outlook": outlook, "reused": reused,
               "wall_seconds": round(time.perf_counter() - started, 1),
               "machine": machine_description()}
    write_outputs(out, result, cfg, console)
    return result


def write_outputs(out: Path, result: dict[str, Any], cfg: FederationConfig,
                  console: Console) -> None:
    """``comparison.json``, the figures, ``report.md``; the tables on the console."""
    from fedmed.evaluation.plots import plot_dice_per_round, plot_per_site_verdict
    from fedmed.evaluation.report import comparison_table, render_report, verdict_table

    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_dice_per_round(out, result)
    if result["per_site_verdict"]:
        plot_per_site_verdict(out, result["per_site_verdict"])
    (out / "report.md").write_text(render_report(result, cfg))
    log = wide(console)
    log.print(comparison_table(result))
    if result["per_site_verdict"]:
        log.print(verdict_table(result))
    console.print(f"report: [bold]{out / 'report.md'}[/]  plot: {out / 'dice_per_round.png'}")


def machine_description() -> dict[str, Any]:
    """Cores, memory and GPU of this machine."""
    import os
    import platform

    import psutil
    import torch

    return {
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
