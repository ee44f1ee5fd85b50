"""What a site's cohort means for patient-level DP, said before training.

DP-SGD (:mod:`fedmed.training.dp`) clips every sampled patient's gradient to norm ``C``
(``max_grad_norm``), sums them and adds Gaussian noise of standard deviation ``sigma * C``
to each of the model's ``d`` parameters. The noise's norm is about ``sigma * C * sqrt(d)``;
the clipped signal's is at most ``B * C`` (``B`` = expected patients per step, all
gradients aligned). Their ratio, ``sigma * sqrt(d) / B``, says how many times the noise
outweighs the largest possible signal at every step -- and ``B`` is bounded by the
cohort: a site with ``n`` patients has ``B <= n``, and with ``B = n`` (sampling rate 1)
there is no amplification by subsampling, so ``sigma`` for a given epsilon is larger too.

Why :data:`NOISE_TO_SIGNAL_LIMIT` is 20: fedmed's DP benchmark (``docs/privacy.md``,
U-Net with d = 31 k parameters, epsilon 8) reached 0.80x the non-DP Dice at a ratio of
about 4 (480 patients per site, B = 64, sigma 1.44) and 0.64x at about 20 (120 patients
per site, B = 16, sigma 1.86); no measured setting above 20 learned usefully, and the demo
(4-11 patients per site, ratio in the hundreds) reached 0.22x. :data:`MIN_PATIENTS` (50)
is where a site's cohort no longer fills the default expected batch with subsampling to
spare (q = 16 / 50 = 0.32).

The sigma is computed exactly as a site computes it (:func:`noise_multiplier_for` over the
planned steps); the site's lifetime ledger may still refuse a run whose budget is spent.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmed.config import FederationConfig
from fedmed.errors import PrivacyError
from fedmed.evaluation.console import wide

NOISE_TO_SIGNAL_LIMIT = 20.0
"""Warn above this ratio of noise norm to the largest clipped signal per step."""
MIN_PATIENTS = 50
"""Warn below this many training patients at a DP site."""
OUTLOOK_HEAD = ["site", "patients", "expected batch B", "q", "steps/epoch", "planned steps",
                "sigma", "noise/signal", "outlook"]
"""The outlook table's columns (console and ``report.md``)."""


def trainable_parameters(cfg: FederationConfig) -> int:
    """``d``: the trainable parameters of the network ``cfg.model`` builds."""
    from fedmed.models import build_model

    model = build_model(cfg.model, cfg.modalities, cfg.num_classes)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _train_cases(cfg: FederationConfig, site: str) -> int:
    """Training patients of ``site`` (its fixed split; no voxel is read)."""
    from fedmed.data.dataset import SiteSplit, site_split_ids

    return len(site_split_ids(cfg, site, fixed=SiteSplit.simulated(cfg, site))["train"])


def site_outlook(
    cfg: FederationConfig, site: str, total_epochs: int, parameters: int
) -> dict[str, Any]:
    """One DP site's figures (see the module docstring).

    Returns:
        ``train_cases``, ``expected_batch``, ``sample_rate``, ``steps_per_epoch``,
        ``planned_steps``, ``noise_multiplier``, ``noise_to_signal`` (``None`` where they
        cannot be computed), ``too_small`` and ``problem`` (a sentence, or ``None``).
    """
    from fedmed.training.dp import noise_multiplier_for, sample_rate_for, steps_per_epoch

    privacy = cfg.privacy_for(site)
    n = _train_cases(cfg, site)
    row: dict[str, Any] = {"train_cases": n, "expected_batch": None, "sample_rate": None,
                           "steps_per_epoch": None, "planned_steps": None,
                           "noise_multiplier": None, "noise_to_signal": None}
    try:
        q = sample_rate_for(privacy, n)
        spe = steps_per_epoch(q)
        row |= {"sample_rate": round(q, 4), "expected_batch": round(q * n, 2),
                "steps_per_epoch": spe, "planned_steps": total_epochs * spe}
        sigma = noise_multiplier_for(privacy, q, total_epochs * spe, None)
    except PrivacyError as exc:
        return row | {"too_small": True, "problem": str(exc)}
    ratio = sigma * math.sqrt(parameters) / (q * n)
    row |= {"noise_multiplier": round(sigma, 4), "noise_to_signal": round(ratio, 1)}
    reasons = ([f"noise/signal {ratio:.0f} > {NOISE_TO_SIGNAL_LIMIT:.0f}"]
               if ratio > NOISE_TO_SIGNAL_LIMIT else [])
    reasons += [f"{n} < {MIN_PATIENTS} patients"] if n < MIN_PATIENTS else []
    problem = None
    if reasons:
        problem = (
            f"{n} training patients, expected batch {q * n:.0f}: every DP step adds noise "
            f"{ratio:.0f}x the largest possible clipped signal (sigma {sigma:.2f}, "
            f"d = {parameters:,} parameters); DP is unlikely to learn well here "
            f"({'; '.join(reasons)}; fedmed's DP benchmark: 0.80x non-DP Dice at "
            "noise/signal 4, 0.64x at 20)"
        )
    return row | {"too_small": problem is not None, "problem": problem}


def dp_outlook(cfg: FederationConfig, total_epochs: int) -> dict[str, Any] | None:
    """Every DP site's outlook, before training; ``None`` when no site trains under DP.

    Args:
        cfg: the config the DP run will use (``privacy.enabled`` and site overrides).
        total_epochs: planned epochs at each site (federated: rounds x local epochs).

    Returns:
        ``target_epsilon``, ``delta``, ``max_grad_norm``, ``parameters``, ``epochs``,
        ``limits``, ``sites`` (site -> :func:`site_outlook`) and ``warnings`` (sentences).
    """
    sites = [s for s in cfg.site_names if cfg.privacy_for(s).enabled]
    if not sites:
        return None
    d = trainable_parameters(cfg)
    rows = {s: site_outlook(cfg, s, total_epochs, d) for s in sites}
    p = cfg.privacy
    return {
        "target_epsilon": p.target_epsilon if p.noise_multiplier is None else None,
        "delta": p.delta, "max_grad_norm": p.max_grad_norm, "parameters": d,
        "epochs": total_epochs,
        "limits": {"noise_to_signal": NOISE_TO_SIGNAL_LIMIT, "min_patients": MIN_PATIENTS},
        "sites": rows,
        "warnings": [f"{s}: {r['problem']}" for s, r in rows.items() if r["problem"]],
    }


def _cell(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def outlook_rows(outlook: dict[str, Any]) -> list[list[str]]:
    """One row of cells per site: the table of the console and of ``report.md``."""
    return [
        [site, _cell(r["train_cases"]), _cell(r["expected_batch"], ".1f"),
         _cell(r["sample_rate"], ".3f"), _cell(r["steps_per_epoch"]),
         _cell(r["planned_steps"]), _cell(r["noise_multiplier"], ".2f"),
         _cell(r["noise_to_signal"], ".1f"), "too small for DP" if r["too_small"] else "ok"]
        for site, r in outlook["sites"].items()
    ]



def outlook_title(outlook: dict[str, Any]) -> str:
    """What the table is for (target, parameters, epochs)."""
    target = outlook["target_epsilon"]
    goal = f"epsilon {target:g}" if target is not None else "a fixed sigma"
    return (
        f"DP outlook: {goal} at delta {outlook['delta']:g} over {outlook['epochs']} "
        f"epoch{'s' if outlook['epochs'] != 1 else ''}, "
        f"d = {outlook['parameters']:,} parameters; noise/signal = sigma * sqrt(d) / B"
    )


def outlook_markdown(outlook: dict[str, Any]) -> list[str]:
    """The outlook as ``report.md`` lines (title, table, warnings)."""
    lines = [
        f"{outlook_title(outlook)} (per step: the noise's norm against the largest clipped "
        "signal).",
        "",
        "| " + " | ".join(OUTLOOK_HEAD) + " |",
        "|---|" + "---:|" * (len(OUTLOOK_HEAD) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in outlook_rows(outlook)]
    if outlook["warnings"]:
        lines += ["", "**Warning: cohorts too small for DP to learn.**", ""]
        lines += [f"- {w}" for w in outlook["warnings"]]
    return lines


def print_outlook(outlook: dict[str, Any] | None, console: Console) -> None:
    """The outlook table and its warnings on the console (nothing when ``None``)."""
    if outlook is None:
        return
    table = Table(title=outlook_title(outlook), title_justify="left")
    for col in OUTLOOK_HEAD:
        table.add_column(col, justify="left" if col in ("site", "outlook") else "right")
    for row in outlook_rows(outlook):
        table.add_row(*row)
    wide(console).print(table)
    for w in outlook["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
