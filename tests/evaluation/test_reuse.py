"""``fedmed compare`` reuses what has not changed: arm keys, and a second compare end to end."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

import fedmed
from fedmed.cli.main import main
from fedmed.config import FederationConfig, load_config
from fedmed.errors import FederationError
from fedmed.evaluation.reuse import (
    MARKER_FILE,
    REUSE_FILE,
    ArmKey,
    data_fingerprint,
    prepare_folder,
    why_not_reusable,
)
from tests.support.federations import make_federation


def _federation(root: Path, cases: int = 4) -> Path:
    return make_federation(
        root, sites=("a", "b"), cases=cases, secure=False,
        training={"epochs": 1, "val_fraction": 0.1, "test_fraction": 0.3},
        federation={"min_available_sites": 2, "min_train_sites": 2},
    )


def _finished(run: Path, key: ArmKey) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    key.write(run)


def test_an_arm_is_reused_only_while_its_inputs_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(_federation(tmp_path / "fed"))
    data = data_fingerprint(cfg)
    assert set(data["sites"]) == {"a", "b"} and data["central_test"]["cases"]
    assert data_fingerprint(cfg) == data  # cheap and stable

    def key(c: FederationConfig = cfg, kind: str = "centralized", d: Any = data) -> ArmKey:
        return ArmKey.of("centralized", kind, c, {"sites": ["a", "b"], "epochs": 1}, d)

    run = tmp_path / "cmp" / "centralized"
    assert why_not_reusable(run, key()) == "not run yet"
    _finished(run, key())
    assert json.loads((run / REUSE_FILE).read_text())["sha256"] == key().sha256
    assert why_not_reusable(run, key()) is None
    # what a pooled arm does not depend on: tracking, the federation's settings
    other = cfg.with_changes(tracking={"tensorboard": False}, federation={"proximal_mu": 0.5})
    assert why_not_reusable(run, key(other)) is None
    assert why_not_reusable(run, key(other, "federated")) is not None
    # what it depends on: the training config, the data, the fedmed version
    lr = cfg.with_changes(training={"learning_rate": 0.5})
    assert why_not_reusable(run, key(lr)) == "changed: config.training"
    case = next((cfg.site_dir("a")).glob("case00/T1.nii.gz"))
    st = case.stat()
    os.utime(case, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert why_not_reusable(run, key(d=data_fingerprint(cfg))) == "changed: data.sites"
    monkeypatch.setattr(fedmed, "__version__", "999.0")
    assert why_not_reusable(run, key()) == "changed: fedmed version"


def test_a_folder_that_is_not_a_comparison_is_refused_without_force(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FederationError, match="not a fedmed comparison"):
        prepare_folder(foreign, force=False)
    prepare_folder(foreign, force=True)
    assert (foreign / MARKER_FILE).is_file() and (foreign / "notes.txt").is_file()
    prepare_folder(foreign, force=False)  # now a comparison folder: written into again
    fresh = tmp_path / "fresh"
    prepare_folder(fresh, force=False)
    assert (fresh / MARKER_FILE).is_file()


def _snapshot(folders: list[Path]) -> dict[str, tuple[int, str]]:
    return {
        str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.integration
def test_a_second_compare_trains_only_the_new_strategy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_federation(tmp_path / "fed", cases=8))
    out = tmp_path / "cmp"
    assert main(["compare", "-c", config, "-o", str(out), "--strategies", "fedavg"]) == 0
    first = json.loads((out / "comparison.json").read_text())
    assert set(first["per_site_verdict"]) == {"a", "b"}
    kept = [out / n for n in ("centralized", "local-a", "local-b", "federated-fedavg")]
    before = _snapshot(kept)
    capsys.readouterr()

    from fedmed.evaluation import baselines
    from fedmed.federation import simulation

    trained: list[str] = []

    def spy(real: Any) -> Any:
        def call(cfg: FederationConfig, run: Path, *args: Any, **kwargs: Any) -> Any:
            trained.append(Path(run).name)
            return real(cfg, run, *args, **kwargs)
        return call

    monkeypatch.setattr(baselines, "run_pooled", spy(baselines.run_pooled))
    monkeypatch.setattr(simulation, "run_federated", spy(simulation.run_federated))
    args = ["compare", "-c", config, "-o", str(out), "--strategies", "fedavg,fedprox"]
    assert main(args) == 0
    assert trained == ["federated-fedprox"]
    printed = capsys.readouterr().out
    for arm in ("centralized", "local-only a", "local-only b", "federated fedavg"):
        assert f"reused {arm} (unchanged config, data and fedmed version)" in printed
    assert _snapshot(kept) == before  # reused folders untouched
    second = json.loads((out / "comparison.json").read_text())
    for key in ("centralized", "local", "local_mean_dice", "per_site_verdict"):
        assert second[key] == first[key]
    assert second["federated"]["fedavg"] == first["federated"]["fedavg"]
    ratio = "ratio_federated_to_centralized"
    assert second[ratio]["fedavg"] == first[ratio]["fedavg"] and "fedprox" in second[ratio]
    assert second["reused"] == ["centralized", "local-only a", "local-only b",
                                "federated fedavg"]
    assert "Reused from an earlier" in (out / "report.md").read_text()
