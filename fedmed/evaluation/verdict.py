"""Per-site verdicts: does each hospital get a better model, on its own patients, by joining?

For every site, on its own test cases: the Dice of the model it could train alone
(local-only), of the global federated model and of its personalised model, each with a
bootstrap 95% interval over its test cases (:func:`fedmed.training.metrics.bootstrap_ci`),
and a verdict -- ``gains``, ``no clear difference`` or ``loses`` -- for the better of the
federated and personalised models against local-only:

- **paired bootstrap** when per-case Dice of both models exist (simulation: the researcher
  evaluated both on the site's test cases; ``summary.json`` ``per_site[site].per_case``):
  the interval of the mean per-case difference; above 0 gains, below 0 loses, else no
  clear difference;
- **interval comparison** when only aggregates exist (the personalised model is evaluated by
  the site itself, which reports ``{dice, ci_low, ci_high}`` and never per-case values):
  gains when the two 95% intervals do not overlap and the model's is higher, loses when
  they do not overlap and it is lower. Conservative: two intervals can overlap while the
  difference's own interval excludes 0.

When the better model's verdict is ``no clear difference`` but the other shows a clear gain,
the site gains (it gets that model). With fewer than :data:`MIN_TEST_CASES` test cases the
interval says little; the verdict is still given, and flagged (``too_few_cases``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedmed.training.metrics import bootstrap_ci

BOOTSTRAP_RESAMPLES = 2000
"""Resamples of every interval of the verdicts (seeded: the same figures, the same interval)."""
MIN_TEST_CASES = 5
"""Below this many test cases a site's interval is flagged as not meaning much."""
GAINS, NO_CLEAR, LOSES = "gains", "no clear difference", "loses"
VERDICTS = (GAINS, NO_CLEAR, LOSES)
PAIRED_RULE = f"paired bootstrap of the per-case difference, {BOOTSTRAP_RESAMPLES} resamples"
INTERVAL_RULE = "site-reported aggregates: 95% intervals compared, overlap is no clear difference"
NO_INTERVAL_RULE = "no interval to compare: no per-case values or reported interval"
CANDIDATES = ("federated", "personalised")


def case_dice(entry: Mapping[str, Any] | None) -> dict[str, float]:
    """Case id -> the case's Dice (mean over foreground classes), from a ``per_site`` entry.

    Args:
        entry: one site's metrics as ``evaluate_everywhere`` writes them, with ``per_case``
            (``[{"case_id", "dice": {class: value}}]``); without it, ``{}``.
    """
    out: dict[str, float] = {}
    for case in (entry or {}).get("per_case") or []:
        values = [float(v) for v in (case.get("dice") or {}).values()
                  if v is not None and math.isfinite(float(v))]
        if values:
            out[str(case.get("case_id"))] = sum(values) / len(values)
    return out


def interval(values: list[float]) -> dict[str, float]:
    """``{dice, ci_low, ci_high}``: the mean of ``values`` and its bootstrap 95% interval."""
    mean, low, high = bootstrap_ci(values, resamples=BOOTSTRAP_RESAMPLES)
    return {"dice": round(mean, 4), "ci_low": round(low, 4), "ci_high": round(high, 4)}


def _interval(
    cases: Mapping[str, float], entry: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """``{dice, ci_low, ci_high}`` over ``cases``; the bare mean (no interval) without them."""
    if cases:
        return interval(list(cases.values()))
    if entry and entry.get("dice_mean") is not None:
        return {"dice": entry["dice_mean"], "ci_low": None, "ci_high": None}
    return None


def _reported(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A site-reported ``{dice, ci_low, ci_high}`` (missing bounds stay ``None``)."""
    if not entry or entry.get("dice") is None:
        return None
    return {k: entry.get(k) for k in ("dice", "ci_low", "ci_high")}


def _sign(low: float, high: float) -> str:
    return GAINS if low > 0 else LOSES if high < 0 else NO_CLEAR


def _paired(model: Mapping[str, float], local: Mapping[str, float]) -> dict[str, Any] | None:
    """The paired interval of ``model - local`` over their common cases."""
    common = sorted(set(model) & set(local))
    if not common:
        return None
    return interval([model[c] - local[c] for c in common])


def _judge(
    name: str, rec: Mapping[str, Any], model_cases: Mapping[str, float],
    local_cases: Mapping[str, float],
) -> tuple[str, str, dict[str, Any]]:
    """``(verdict, rule, difference)`` of candidate ``name`` against local-only."""
    if model_cases and local_cases:
        diff = _paired(model_cases, local_cases)
        if diff is not None:
            return _sign(diff["ci_low"], diff["ci_high"]), PAIRED_RULE, diff
    model, local = rec[name], rec["local"]
    diff = {"dice": round(model["dice"] - local["dice"], 4), "ci_low": None, "ci_high": None}
    bounds = (model["ci_low"], model["ci_high"], local["ci_low"], local["ci_high"])
    if any(b is None for b in bounds):
        return NO_CLEAR, NO_INTERVAL_RULE, diff
    if model["ci_low"] > local["ci_high"]:
        return GAINS, INTERVAL_RULE, diff
    if model["ci_high"] < local["ci_low"]:
        return LOSES, INTERVAL_RULE, diff
    return NO_CLEAR, INTERVAL_RULE, diff


def site_verdict(
    local: Mapping[str, Any] | None,
    federated: Mapping[str, Any] | None,
    personalised: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One site's verdict.

    Args:
        local: the local-only model's metrics on the site's test cases (a ``per_site``
            entry, with ``per_case`` for intervals).
        federated: the global federated model's, likewise.
        personalised: the site-reported ``{dice, ci_low, ci_high}`` of its personalised
            model, or ``None``.

    Returns:
        ``local``, ``federated``, ``personalised`` (each ``{dice, ci_low, ci_high}`` or
        ``None``), ``verdict``, ``test_cases``, ``too_few_cases``, ``compared`` (which model
        the verdict is about), ``difference`` (its Dice minus local-only's, with the paired
        interval when there is one) and ``rule``.
    """
    lc, fc = case_dice(local), case_dice(federated)
    rec: dict[str, Any] = {
        "local": _interval(lc, local),
        "federated": _interval(fc, federated),
        "personalised": _reported(personalised),
    }
    n = len(lc) if lc else int((local or {}).get("num_cases") or 0)
    rec |= {"test_cases": n, "too_few_cases": n < MIN_TEST_CASES}
    present = [c for c in CANDIDATES if rec[c] is not None]
    if rec["local"] is None or not present:
        return rec | {"verdict": NO_CLEAR, "compared": None, "difference": None,
                      "rule": "nothing to compare"}
    cases = {"federated": fc, "personalised": {}}
    judged = {c: _judge(c, rec, cases[c], lc) for c in present}
    best = max(present, key=lambda c: rec[c]["dice"])  # ties: federated (listed first)
    chosen = best
    if judged[best][0] == NO_CLEAR:
        chosen = next((c for c in present if judged[c][0] == GAINS), best)
    verdict, rule, diff = judged[chosen]
    return rec | {"verdict": verdict, "compared": chosen, "difference": diff, "rule": rule}


def personalised_entry(
    site: str, federated: Mapping[str, Mapping[str, Any]], prefer: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The site's personalised model's reported figures and the run they come from.

    From ``per_site_final[site].personalised`` of the federated summaries: run ``prefer``
    first, then the others in order; ``(None, None)`` when no run personalised.
    """
    order = [n for n in federated if n == prefer] + [n for n in federated if n != prefer]
    for name in order:
        entry = ((federated[name].get("per_site_final") or {}).get(site) or {})
        if entry.get("personalised"):
            return dict(entry["personalised"]), name
    return None, None


def per_site_verdicts(
    sites: list[str],
    local: Mapping[str, Mapping[str, Any]],
    federated: Mapping[str, Mapping[str, Any]],
    basis: str | None,
) -> dict[str, dict[str, Any]]:
    """Every site's verdict (:func:`site_verdict`).

    Args:
        sites: the training sites.
        local: site -> its local-only run's ``summary.json``.
        federated: run name -> federated ``summary.json`` (non-DP runs only).
        basis: the federated run whose global model is judged (FedAvg when it ran).

    Returns:
        site -> the verdict record, plus ``federated_run`` and ``personalised_run``.
    """
    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        own = (local.get(site) or {}).get("per_site", {}).get(site)
        fed = (federated[basis].get("per_site") or {}).get(site) if basis else None
        pers, pers_run = personalised_entry(site, federated, basis)
        out[site] = site_verdict(own, fed, pers) | {
            "federated_run": basis, "personalised_run": pers_run,
        }
    return out


def verdict_basis(names: list[str]) -> str | None:
    """The federated run judged: ``fedavg`` when it ran, else the first one."""
    if "fedavg" in names:
        return "fedavg"
    return names[0] if names else None
