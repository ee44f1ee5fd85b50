"""Per-site verdicts: the bootstrap, the decision rules, the report section and the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmed.evaluation.plots import plot_per_site_verdict
from fedmed.evaluation.verdict import (
    GAINS,
    INTERVAL_RULE,
    LOSES,
    NO_CLEAR,
    PAIRED_RULE,
    per_site_verdicts,
    site_verdict,
    verdict_basis,
)


def _entry(values: list[float] | np.ndarray, prefix: str = "c") -> dict[str, Any]:
    """A ``per_site`` entry as evaluate_everywhere writes it (two classes per case)."""
    cases = [{"case_id": f"{prefix}{i}", "dice": {"1": float(v), "2": float(v)}}
             for i, v in enumerate(values)]
    return {"dice_mean": float(np.mean(values)), "num_cases": len(cases), "per_case": cases}


def test_paired_bootstrap_sees_a_consistent_gain_that_intervals_hide() -> None:
    rng = np.random.default_rng(0)
    local = rng.uniform(0.4, 0.9, 12)  # cases differ a lot from each other
    v = site_verdict(_entry(local), _entry(local + 0.03 + rng.normal(0, 0.005, 12)), None)
    assert v["verdict"] == GAINS and v["rule"] == PAIRED_RULE and v["compared"] == "federated"
    # the two models' own intervals overlap: only the pairing shows the gain
    assert v["federated"]["ci_low"] < v["local"]["ci_high"]
    assert v["difference"]["ci_low"] > 0
    assert v["difference"]["dice"] == pytest.approx(0.03, abs=0.01)
    assert site_verdict(_entry(local), _entry(local + 0.03), None)["verdict"] == GAINS
    assert v["test_cases"] == 12 and not v["too_few_cases"]
    loses = site_verdict(_entry(local), _entry(local - 0.2), None)
    assert loses["verdict"] == LOSES and loses["difference"]["ci_high"] < 0
    noise = np.tile([0.05, -0.05], 6)
    same = site_verdict(_entry(local), _entry(local + noise), None)
    assert same["verdict"] == NO_CLEAR
    assert same["difference"]["ci_low"] < 0 < same["difference"]["ci_high"]


def test_site_reported_personalised_figures_use_the_interval_rule() -> None:
    local = _entry(np.full(8, 0.6) + np.linspace(-0.02, 0.02, 8))
    fed = _entry(np.full(8, 0.5))
    v = site_verdict(local, fed, {"dice": 0.8, "ci_low": 0.75, "ci_high": 0.85})
    assert (v["verdict"], v["compared"], v["rule"]) == (GAINS, "personalised", INTERVAL_RULE)
    assert v["difference"]["ci_low"] is None and v["difference"]["dice"] == pytest.approx(0.2)
    overlap = site_verdict(local, fed, {"dice": 0.62, "ci_low": 0.5, "ci_high": 0.7})
    assert (overlap["verdict"], overlap["rule"]) == (NO_CLEAR, INTERVAL_RULE)
    # the personalised model is better on the point but inconclusive; the global model's
    # paired gain is clear: the site gains (it gets that model)
    fed_up = _entry([c["dice"]["1"] + 0.05 for c in local["per_case"]])
    up = site_verdict(local, fed_up, {"dice": 0.7, "ci_low": 0.3, "ci_high": 0.99})
    assert (up["verdict"], up["compared"], up["rule"]) == (GAINS, "federated", PAIRED_RULE)


def test_few_cases_are_flagged_and_missing_models_give_no_verdict() -> None:
    v = site_verdict(_entry([0.7, 0.8, 0.75]), _entry([0.5, 0.6, 0.55]), None)
    assert v["too_few_cases"] and v["test_cases"] == 3 and v["verdict"] == LOSES
    alone = site_verdict(_entry([0.7, 0.8]), None, None)
    assert alone["verdict"] == NO_CLEAR and alone["compared"] is None
    assert alone["federated"] is None and alone["personalised"] is None


def _summaries() -> tuple[dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.7, 0.9, 6), rng.uniform(0.5, 0.7, 3)
    local = {"a": {"per_site": {"a": _entry(a, "a")}}, "b": {"per_site": {"b": _entry(b, "b")}}}
    fed = {
        "fedprox": {"per_site": {"a": _entry(a, "a"), "b": _entry(b, "b")}},
        "fedavg": {
            "per_site": {"a": _entry(a + 0.05, "a"), "b": _entry(b - 0.2, "b")},
            "per_site_final": {
                "a": {"global": {"dice": 0.85}, "personalised": None, "test_cases": 6},
                "b": {"global": {"dice": 0.4},
                      "personalised": {"dice": 0.66, "ci_low": 0.6, "ci_high": 0.7},
                      "test_cases": 3},
            },
        },
    }
    return local, fed


def test_per_site_verdicts_take_fedavg_and_the_sites_personalised_models(tmp_path: Path) -> None:
    local, fed = _summaries()
    assert verdict_basis(list(fed)) == "fedavg" and verdict_basis(["fedprox"]) == "fedprox"
    out = per_site_verdicts(["a", "b"], local, fed, "fedavg")
    assert out["a"]["verdict"] == GAINS and out["a"]["personalised"] is None
    assert out["a"]["federated_run"] == "fedavg" and out["a"]["personalised_run"] is None
    assert out["b"]["personalised"] == {"dice": 0.66, "ci_low": 0.6, "ci_high": 0.7}
    assert out["b"]["personalised_run"] == "fedavg" and out["b"]["compared"] == "personalised"
    assert out["b"]["too_few_cases"]
    for v in out.values():
        assert {"local", "federated", "personalised", "verdict", "test_cases"} <= set(v)
        assert {"dice", "ci_low", "ci_high"} == set(v["local"])
    png = plot_per_site_verdict(tmp_path, out)
    assert png.name == "per_site_verdict.png" and png.stat().st_size > 10_000


def test_the_report_says_each_sites_verdict() -> None:
    from fedmed.evaluation.report import verdict_section

    local, fed = _summaries()
    text = "\n".join(verdict_section(
        {"per_site_verdict": per_site_verdicts(["a", "b"], local, fed, "fedavg")}))
    assert "## Does each hospital gain by joining?" in text
    assert "| a | 6 |" in text and "**a gains**" in text
    assert "Only 3 test cases (fewer than 5)" in text
    assert "per_site_verdict.png" in text
    assert verdict_section({"per_site_verdict": {}}) == []


def test_the_report_lists_the_sites_refusals() -> None:
    from fedmed.evaluation.report import refusals_section

    result = {"federated": {
        "fedavg": {"sites_refused": {"b": {"dp-required": 3}},
                   "sites_refused_final": {"a": "too-few-cases-for-metric"}},
        "fedprox": {},
    }}
    text = "\n".join(refusals_section(result))
    assert "| fedavg | b | dp-required | 3 |" in text
    assert "| fedavg | a | too-few-cases-for-metric (final round) | 1 |" in text
    assert refusals_section({"federated": {"fedprox": {}}}) == []
