"""Evaluation of one model on every held-out set: central test, site test splits, unseen sites.

Used by every mode (the centralized and local-only baselines in :mod:`fedmed.evaluation`,
the federated coordinator in :mod:`fedmed.federation`) so that their figures are
comparable: same cases, same sliding-window inference, same metrics. It lives here, below
both callers, so that neither imports upwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedmed.config import FederationConfig
from fedmed.errors import FedMedError
from fedmed.training.trainer import LocalTrainer

log = logging.getLogger(__name__)


def unseen_name(path: Path) -> str:
    """The display name of an unseen-scanner test site (its folder name)."""
    return path.name


def _pseudonymous(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with each case named by its position in the split, not by its id.

    Every model is evaluated on the same cases in the same order, so positions pair them as
    well as ids would, and the run folder names no patient.
    """
    for i, case in enumerate(metrics.get("per_case") or []):
        case["case_id"] = f"test-{i:03d}"
    return metrics


def evaluate_everywhere(
    trainer: LocalTrainer, cfg: FederationConfig, *, sites: bool = True, unseen: bool = True
) -> dict[str, Any]:
    """Metrics on the central test set, each site's test cases and the unseen sites.

    Args:
        trainer: holds the model to evaluate.
        cfg: the federation config (where the test sets are).
        sites: also evaluate each training site's test split.
        unseen: also evaluate the unseen-scanner sites.

    Returns:
        ``dice_mean``, ``dice_per_class``, ``hd95_mean`` (of the central test set, or of the
        pooled site test cases when the config has no central test set), ``central`` (all
        metrics), ``per_site`` (site -> Dice metrics, ``hd95_mean`` None, with ``per_case``:
        each test case's Dice per class) and ``unseen`` (name -> metrics).
    """
    from fedmed.data.dataset import SiteSplit, load_site_cases, load_test_cases

    out: dict[str, Any] = {"per_site": {}, "unseen": {}}
    pooled = []
    if sites:
        for name in cfg.site_names:
            try:
                cases = load_site_cases(cfg, name, "test", fixed=SiteSplit.simulated(cfg, name))
            except FedMedError as exc:
                log.warning("site %s: cannot evaluate its test cases: %s", name, exc)
                continue
            if cases:
                pooled.extend(cases)
                # per-case Dice too: the researcher's per-site verdict (fedmed compare)
                # pairs models case by case; simulation only, never sent by a site. Dice
                # only: HD95 costs about a second per case and the verdict does not use it.
                out["per_site"][name] = _pseudonymous(
                    trainer.evaluate(cases, hd95=False).as_dict(True)
                )
    if cfg.central_test is not None:
        central = trainer.evaluate(load_test_cases(cfg, cfg.resolve(cfg.central_test)))
    elif pooled:
        central = trainer.evaluate(pooled)
    else:
        raise FedMedError("no test cases: set central_test in the config or give sites test cases")
    out["central"] = central.as_dict()
    out["dice_mean"] = out["central"]["dice_mean"]
    out["dice_per_class"] = out["central"]["dice_per_class"]
    out["hd95_mean"] = out["central"]["hd95_mean"]
    if unseen:
        for path in cfg.unseen_sites:
            p = cfg.resolve(path)
            out["unseen"][unseen_name(p)] = trainer.evaluate(load_test_cases(cfg, p)).as_dict()
    return out
