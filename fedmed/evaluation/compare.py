"""``fedmed compare``: centralized vs local-only vs federated, under matched compute.

The compute rule: every approach gets the same number of training passes over the pooled
training data. Centralized trains ``E`` epochs on all cases; each site alone trains ``E``
epochs on its own cases (together: ``E`` passes over the pool); each federated strategy runs
``R`` rounds of ``L`` local epochs with ``R x L = E``. All are evaluated on the same central
test set, the same per-site test cases and the same unseen-scanner sites.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmed.config import FederationConfig
from fedmed.errors import ConfigError, FederationError

DEFAULT_STRATEGIES = ("fedavg", "fedprox", "fedbn")


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


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("dice_mean", "dice_per_class", "hd95_mean", "per_site", "unseen", "wall_seconds")
    return {k: summary.get(k) for k in keys} | (
        {"epsilon": summary["epsilon"]} if "epsilon" in summary else {}
    )


def run_comparison(
    cfg: FederationConfig,
    out: Path,
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    dp: bool = False,
    force: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every approach and write ``comparison.json``, ``report.md``, ``dice_per_round.png``.

    Args:
        cfg: the federation config.
        out: the comparison folder (one run directory per approach inside).
        strategies: federated strategies to run.
        dp: also run FedAvg with patient-level DP (``privacy`` section, enabled).
        force: replace an existing comparison folder.
        console: progress output.
    """
    from fedmed.evaluation.baselines import run_pooled
    from fedmed.federation.simulation import run_federated

    console = console or Console()
    if out.exists() and any(out.iterdir()) and not force:
        raise FederationError(f"{out} already holds files; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    rounds, local_epochs = matched_rounds(cfg)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "compute_rule": (
            f"every approach makes {cfg.training.epochs} passes over the pooled training data: "
            f"centralized {cfg.training.epochs} epochs; each site alone {cfg.training.epochs} "
            f"epochs on its own cases; federated {rounds} rounds x {local_epochs} local epochs"
        ),
        "epochs": cfg.training.epochs,
        "rounds": rounds,
        "local_epochs": local_epochs,
    }
    console.rule("centralized (all data pooled)")
    result["centralized"] = _headline(
        run_pooled(cfg, out / "centralized", force=True, console=console)
    )
    result["local"] = {}
    for site in cfg.site_names:
        console.rule(f"local only: {site}")
        s = run_pooled(
            cfg, out / f"local-{site}", sites=[site], mode="local", force=True, console=console
        )
        result["local"][site] = _headline(s)
    locals_ = [v["dice_mean"] for v in result["local"].values() if v["dice_mean"] is not None]
    result["local_mean_dice"] = sum(locals_) / len(locals_) if locals_ else None
    result["federated"] = {}
    fed_cfg = cfg.with_changes(federation={"rounds": rounds, "local_epochs": local_epochs})
    runs = [(s, s, fed_cfg) for s in strategies]
    if dp:
        runs.append(("fedavg-dp", "fedavg", fed_cfg.with_changes(privacy={"enabled": True})))
    for name, strategy, run_cfg in runs:
        console.rule(f"federated: {name}")
        s = run_federated(run_cfg, out / f"federated-{name}", strategy=strategy, force=True)
        result["federated"][name] = _headline(s) | {"strategy": strategy, "rounds": rounds}
    central = result["centralized"]["dice_mean"]
    result["ratio_federated_to_centralized"] = {
        name: (r["dice_mean"] / central if central and r["dice_mean"] is not None else None)
        for name, r in result["federated"].items()
    }
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_description()
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_dice_per_round(out, result)
    (out / "report.md").write_text(render_report(result, cfg))
    table = comparison_table(result)
    if console.is_terminal:
        console.print(table)
    else:
        # logs (CI, nohup, make demo | tee) default to 80 columns, which truncates every cell
        Console(width=max(console.width, 160), file=console.file).print(table)
    console.print(f"report: [bold]{out / 'report.md'}[/]  plot: {out / 'dice_per_round.png'}")
    return result


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


def _rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], float | None]]:
    central = result["centralized"]["dice_mean"]
    rows: list[tuple[str, dict[str, Any], float | None]] = [
        ("centralized", result["centralized"], 1.0)
    ]
    for site, r in result["local"].items():
        rows.append((f"local-only {site}", r, r["dice_mean"] / central if central else None))
    for name, r in result["federated"].items():
        rows.append((f"federated {name}", r, result["ratio_federated_to_centralized"][name]))
    return rows


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def comparison_table(result: dict[str, Any]) -> Table:
    """The headline table for the terminal."""
    classes = list(result["centralized"]["dice_per_class"])
    unseen = list(result["centralized"].get("unseen") or {})
    table = Table(title="federated vs centralized vs local-only (central test set)")
    for col in [
        "approach",
        "Dice",
        *classes,
        "HD95",
        "x centralized",
        *[f"unseen {u}" for u in unseen],
    ]:
        table.add_column(
            col, justify="left" if col == "approach" else "right", no_wrap=col == "approach"
        )
    for name, r, ratio in _rows(result):
        table.add_row(
            name,
            _fmt(r["dice_mean"]),
            *[_fmt(r["dice_per_class"].get(c)) for c in classes],
            _fmt(r["hd95_mean"], 1),
            _fmt(ratio),
            *[_fmt((r.get("unseen") or {}).get(u, {}).get("dice_mean")) for u in unseen],
        )
    return table


def render_report(result: dict[str, Any], cfg: FederationConfig) -> str:
    """``report.md``: the table, the compute rule, the machine, wall times, epsilon."""
    classes = list(result["centralized"]["dice_per_class"])
    unseen = list(result["centralized"].get("unseen") or {})
    head = [
        "approach",
        "Dice",
        *classes,
        "HD95 (mm)",
        "x centralized",
        *[f"unseen {u}" for u in unseen],
        "wall s",
    ]
    lines = [
        f"# Federated vs centralized: {cfg.name}",
        "",
        f"Compute rule: {result['compute_rule']}.",
        "",
        "Dice on the central test set (foreground classes; `Dice` is their mean), the ratio to "
        "the centralized baseline, and Dice on each unseen-scanner site.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r, ratio in _rows(result):
        cells = [
            name,
            _fmt(r["dice_mean"]),
            *[_fmt(r["dice_per_class"].get(c)) for c in classes],
            _fmt(r["hd95_mean"], 1),
            _fmt(ratio),
            *[_fmt((r.get("unseen") or {}).get(u, {}).get("dice_mean")) for u in unseen],
            _fmt(r.get("wall_seconds"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean of local-only Dice: {_fmt(result['local_mean_dice'])}.", ""]
    lines += [
        "## Per-site test cases",
        "",
        "| approach | " + " | ".join(cfg.site_names) + " |",
        "|---|" + "---|" * len(cfg.site_names),
    ]
    for name, r, _ in _rows(result):
        per = r.get("per_site") or {}
        lines.append(
            "| "
            + name
            + " | "
            + " | ".join(_fmt(per.get(s, {}).get("dice_mean")) for s in cfg.site_names)
            + " |"
        )
    eps_rows = [(n, r["epsilon"]) for n, r in result["federated"].items() if r.get("epsilon")]
    if eps_rows:
        lines += [
            "",
            "## Differential privacy (patient level)",
            "",
            "| run | Dice | " + " | ".join(f"epsilon {s}" for s in cfg.site_names) + " |",
            "|---|---|" + "---|" * len(cfg.site_names),
        ]
        for n, eps in eps_rows:
            lines.append(
                f"| {n} | {_fmt(result['federated'][n]['dice_mean'])} | "
                + " | ".join(_fmt(eps.get(s), 2) for s in cfg.site_names)
                + " |"
            )
        lines.append(f"\ndelta = {cfg.privacy.delta:g}")
    m = result["machine"]
    lines += [
        "",
        "## Machine",
        "",
        f"{m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"total wall time {result['wall_seconds']:.0f} s.",
        "",
        "![central Dice per round](dice_per_round.png)",
        "",
    ]
    return "\n".join(lines)


def plot_dice_per_round(out: Path, result: dict[str, Any]) -> Path:
    """``dice_per_round.png``: central Dice per round per strategy, with reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmed.federation.rundir import RunDir

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result["federated"]:
        lines = [m for m in RunDir(out / f"federated-{name}").metrics() if "central_dice" in m]
        ax.plot(
            [m["round"] for m in lines], [m["central_dice"] for m in lines], marker="o", label=name
        )
    central = result["centralized"]["dice_mean"]
    if central is not None:
        ax.axhline(central, color="black", linestyle="--", label=f"centralized ({central:.3f})")
    locals_ = {s: r["dice_mean"] for s, r in result["local"].items() if r["dice_mean"] is not None}
    if locals_:
        best = max(locals_, key=lambda s: locals_[s])
        ax.axhline(
            locals_[best],
            color="grey",
            linestyle=":",
            label=f"best local-only {best} ({locals_[best]:.3f})",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("Dice, central test set (mean over foreground classes)")
    ax.set_title("Federated training: central Dice per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "dice_per_round.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
