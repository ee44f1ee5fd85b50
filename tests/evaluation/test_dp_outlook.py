"""The DP outlook: what each site's cohort means for DP, computed as the sites compute it."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from fedmed.config import FederationConfig, load_config
from fedmed.evaluation import dp_outlook as outlook_mod
from fedmed.evaluation.dp_outlook import (
    dp_outlook,
    outlook_markdown,
    print_outlook,
    trainable_parameters,
)
from fedmed.training.dp import noise_multiplier_for, sample_rate_for, steps_per_epoch
from tests.support.federations import make_federation


@pytest.fixture
def small_cfg(tmp_path: Path) -> FederationConfig:
    path = make_federation(tmp_path, sites=("a", "b"), cases=6, secure=False,
                           privacy={"enabled": True, "target_epsilon": 8.0})
    return load_config(path)


def test_outlook_matches_the_sites_own_dp_plan(small_cfg: FederationConfig) -> None:
    out = dp_outlook(small_cfg, total_epochs=6)
    assert out is not None and set(out["sites"]) == {"a", "b"}
    d = trainable_parameters(small_cfg)
    assert out["parameters"] == d and out["epochs"] == 6
    for row in out["sites"].values():
        n = row["train_cases"]
        assert 0 < n < 6
        privacy = small_cfg.privacy
        q = sample_rate_for(privacy, n)
        assert q == 1.0  # the default expected batch (16) exceeds the cohort
        steps = 6 * steps_per_epoch(q)
        sigma = noise_multiplier_for(privacy, q, steps, None)
        assert row["planned_steps"] == steps and row["expected_batch"] == n
        assert row["noise_multiplier"] == pytest.approx(sigma, abs=1e-4)
        assert row["noise_to_signal"] == pytest.approx(sigma * math.sqrt(d) / n, abs=0.1)
        assert row["too_small"] and "DP is unlikely to learn well" in row["problem"]
    assert len(out["warnings"]) == 2 and out["warnings"][0].startswith("a: ")


def test_a_large_cohort_is_ok_and_sites_without_dp_are_left_out(
    small_cfg: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_cfg.with_changes(
        sites=[{"name": "a", "path": str(small_cfg.site_dir("a"))},
               {"name": "b", "path": str(small_cfg.site_dir("b")),
                "privacy": {"enabled": False}}],
        privacy={"expected_batch_size": 64},
    )
    monkeypatch.setattr(outlook_mod, "_train_cases", lambda cfg, site: 480)
    out = dp_outlook(cfg, total_epochs=24)
    assert out is not None and list(out["sites"]) == ["a"]
    row = out["sites"]["a"]
    assert row["sample_rate"] == pytest.approx(64 / 480, abs=1e-4)
    assert row["steps_per_epoch"] == 8 and row["planned_steps"] == 192
    assert row["noise_to_signal"] < outlook_mod.NOISE_TO_SIGNAL_LIMIT
    assert not row["too_small"] and out["warnings"] == []
    assert dp_outlook(cfg.with_changes(privacy={"enabled": False}, sites=[
        {"name": "a", "path": str(cfg.site_dir("a"))}]), total_epochs=2) is None


def test_outlook_is_printed_and_reported(small_cfg: FederationConfig) -> None:
    out = dp_outlook(small_cfg, total_epochs=2)
    assert out is not None
    buffer = io.StringIO()
    console = Console(file=buffer, width=80)  # a log, not a terminal: printed wide anyway
    print_outlook(out, console)
    text = buffer.getvalue()
    assert "| too small for DP |" in text.replace("│", "|")
    assert "noise/signal" in text and "too small for DP" in text and "warning:" in text
    md = "\n".join(outlook_markdown(out))
    assert "| site | patients | expected batch B |" in md
    assert "**Warning: cohorts too small for DP to learn.**" in md
    print_outlook(None, console)  # no DP: nothing


def test_simulate_prints_the_outlook_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmed.cli.main import main
    from fedmed.federation import simulation

    path = make_federation(tmp_path, sites=("a", "b"), cases=6, secure=False,
                           privacy={"enabled": True, "target_epsilon": 8.0})
    before_training: list[str] = []

    def fake_run(*args: object, **kwargs: object) -> dict[str, float]:
        before_training.append(capsys.readouterr().out)
        return {"wall_seconds": 1.0, "dice_mean": 0.5, "hd95_mean": 1.0}

    monkeypatch.setattr(simulation, "run_federated", fake_run)
    assert main(["simulate", "-c", str(path), "-o", str(tmp_path / "run")]) == 0
    printed = " ".join(before_training[0].split())
    assert "DP outlook" in printed and "warning: a:" in printed and "warning: b:" in printed
    # without DP: no outlook
    plain = make_federation(tmp_path / "plain", sites=("a", "b"), cases=6, secure=False)
    assert main(["simulate", "-c", str(plain), "-o", str(tmp_path / "run2")]) == 0
    assert "DP outlook" not in before_training[1]


def test_the_report_says_why_dp_cost_what_it_did(small_cfg: FederationConfig) -> None:
    from fedmed.evaluation.report import dp_section

    outlook = dp_outlook(small_cfg, total_epochs=2)
    result = {
        "federated": {
            "fedavg": {"dice_mean": 0.86},
            "fedavg-dp": {"dice_mean": 0.19, "epsilon": {"a": 7.99, "b": 7.98}},
        },
        "dp_outlook": outlook,
    }
    text = "\n".join(dp_section(result, small_cfg))
    assert "| fedavg-dp | 0.190 | 7.99 | 7.98 |" in text
    assert "### What each cohort means for DP" in text
    assert "**Warning: cohorts too small for DP to learn.**" in text
    assert "fedavg-dp reached Dice 0.190, 0.22x fedavg without DP (0.860)" in text
    assert dp_section({"federated": {"fedavg": {"dice_mean": 0.8}}, "dp_outlook": None},
                      small_cfg) == []
