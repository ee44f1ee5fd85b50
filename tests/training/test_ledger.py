"""The privacy ledger: exact recomputation with Opacus, persistence, restarts, the report CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmed.cli.main import main
from fedmed.errors import PrivacyError
from fedmed.training.ledger import (
    PrivacyLedger,
    compute_epsilon,
    find_ledgers,
    ledger_path,
    merge_history,
)

DELTA = 1e-5
ROUNDS = [(1.1, 0.25, 8), (1.1, 0.25, 8), (1.3, 0.2, 10)]


def _stepped(acc: RDPAccountant | PRVAccountant) -> float:
    """Opacus' accountant fed one ``step`` per DP step: the independent reference."""
    for sigma, q, steps in ROUNDS:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=DELTA))


def _fill(ledger: PrivacyLedger) -> list[float]:
    return [
        ledger.record(round_index=r + 1, steps=s, sample_rate=q, noise_multiplier=sig,
                      epochs=2, num_cases=40, max_grad_norm=1.0).epsilon
        for r, (sig, q, s) in enumerate(ROUNDS)
    ]


def test_epsilon_equals_opacus_accountant_stepped(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", "site-a", accountant="rdp", delta=DELTA)
    logged = _fill(ledger)
    reference = _stepped(RDPAccountant())
    assert ledger.epsilon() == reference  # same composition, exact
    assert logged[-1] == pytest.approx(reference, rel=0.01)
    # epsilon grows with every round and the per-round values are the partial compositions
    assert logged[0] < logged[1] < logged[2]
    partial = RDPAccountant()
    partial.history = [ROUNDS[0]]
    assert logged[0] == pytest.approx(partial.get_epsilon(delta=DELTA), rel=1e-12)


def test_prv_ledger_matches_prv_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", "site-a", accountant="prv", delta=DELTA)
    _fill(ledger)
    # Opacus' PRV accountant stepped one DP step at a time composes the same mechanisms
    assert ledger.epsilon() == _stepped(PRVAccountant())
    assert merge_history(ROUNDS) == [(1.1, 0.25, 16), (1.3, 0.2, 10)]
    # PRV is tighter than RDP for the same composition
    assert ledger.epsilon() < compute_epsilon(ROUNDS, DELTA, "rdp")


def test_ledger_survives_restart(tmp_path: Path) -> None:
    first = PrivacyLedger.open(tmp_path, "run-1", "site-a", accountant="rdp", delta=DELTA)
    first.record(round_index=1, steps=8, sample_rate=0.25, noise_multiplier=1.1)
    eps1 = first.epsilon()
    # a restarted client opens the same file and continues the count
    again = PrivacyLedger.open(tmp_path, "run-1", "site-a", accountant="rdp", delta=DELTA)
    assert again.epsilon() == eps1 and again.total_steps == 8
    again.record(round_index=2, steps=8, sample_rate=0.25, noise_multiplier=1.1)
    assert again.epsilon() > eps1
    assert again.epsilon() == compute_epsilon([(1.1, 0.25, 16)], DELTA)
    # another site or run has its own ledger
    other = PrivacyLedger.open(tmp_path, "run-1", "site-b", accountant="rdp", delta=DELTA)
    assert other.epsilon() == 0.0 and other.path != again.path
    data = json.loads(ledger_path(tmp_path, "run-1", "site-a").read_text())
    assert [e["round"] for e in data["entries"]] == [1, 2]
    assert data["history"] == [[1.1, 0.25, 8], [1.1, 0.25, 8]]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_ledger_rejects_changed_settings_and_bad_files(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "r", "s", accountant="rdp", delta=DELTA)
    ledger.record(round_index=1, steps=4, sample_rate=0.5, noise_multiplier=2.0)
    with pytest.raises(PrivacyError, match="accountant='rdp'"):
        PrivacyLedger.open(tmp_path, "r", "s", accountant="prv", delta=DELTA)
    with pytest.raises(PrivacyError, match="delta"):
        PrivacyLedger.open(tmp_path, "r", "s", accountant="rdp", delta=1e-6)
    ledger.path.write_text("{not json")
    with pytest.raises(PrivacyError, match="cannot be read"):
        PrivacyLedger.open(tmp_path, "r", "s", accountant="rdp", delta=DELTA)
    with pytest.raises(PrivacyError, match="accountant"):
        PrivacyLedger.open(tmp_path, "r", "s2", accountant="gdp", delta=DELTA)


def test_privacy_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for site in ("hospital-a", "hospital-b"):
        ledger = PrivacyLedger.open(
            tmp_path / site / ".fedmed-state", "run 7", site, accountant="rdp", delta=DELTA
        )
        ledger.record(round_index=1, steps=8, sample_rate=0.25, noise_multiplier=1.1)
    ledger.record_skip(4, "privacy budget exhausted: test")
    assert len(find_ledgers(tmp_path)) == 2
    assert main(["privacy", "report", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["site"] for d in report] == ["hospital-a", "hospital-b"]
    assert report[0]["epsilon"] == compute_epsilon([(1.1, 0.25, 8)], DELTA)
    assert report[0]["entries"][0]["steps"] == 8 and report[0]["run_id"] == "run 7"
    assert report[1]["skips"][0]["round"] == 4
    assert main(["privacy", "report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hospital-b" in out and "exhausted" in out
    assert main(["privacy", "report", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
