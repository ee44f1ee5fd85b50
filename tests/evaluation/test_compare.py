"""fedmed compare end to end on a tiny generated federation (real Flower simulation)."""

import json
from pathlib import Path

import pytest
import yaml

from fedmed.cli.main import main
from fedmed.config import load_config
from fedmed.data.synth import generate_federation
from fedmed.errors import ConfigError
from fedmed.evaluation.compare import matched_rounds
from fedmed.evaluation.reuse import REUSE_FILE
from fedmed.evaluation.verdict import VERDICTS


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    path = generate_federation(
        root / "fed",
        sites=2,
        cases_per_site=5,
        test_cases=2,
        unseen_cases=2,
        scale=2.5,
        progress=False,
    )
    d = yaml.safe_load(path.read_text())
    d["preprocessing"] = {
        "target_spacing": [5.0, 5.0, 5.0],
        "patch_size": [16, 16, 16],
        "augment": False,
    }
    d["model"] = {"channels": [4, 8, 16], "num_res_units": 0}
    d["training"] = {"epochs": 2, "batch_size": 2, "learning_rate": 1e-2, "progress": False}
    d["federation"] = {"rounds": 5, "local_epochs": 1, "max_parallel_sites": 1}
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_compare_writes_the_contract(tiny_federation: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--config",
            str(tiny_federation),
            "--out",
            str(out),
            "--strategies",
            "fedavg,fedbn",
        ]
    )
    assert rc == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["local"]) == {"hospital-a", "hospital-b"}
    assert set(result["federated"]) == {"fedavg", "fedbn"}
    for approach in [
        result["centralized"],
        *result["local"].values(),
        *result["federated"].values(),
    ]:
        assert {"dice_mean", "dice_per_class", "hd95_mean", "per_site"} <= set(approach)
        assert 0.0 <= approach["dice_mean"] <= 1.0
    ratio = result["ratio_federated_to_centralized"]["fedavg"]
    assert ratio == pytest.approx(
        result["federated"]["fedavg"]["dice_mean"] / result["centralized"]["dice_mean"]
    )
    # matched compute: 2 epochs = 2 rounds x 1 local epoch, whatever the config said
    assert result["rounds"] * result["local_epochs"] == 2
    metrics = (out / "federated-fedavg" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
    report = (out / "report.md").read_text()
    assert "Compute rule" in report and "federated fedbn" in report
    assert (out / "dice_per_round.png").stat().st_size > 10_000
    # the per-site verdict: each site's own test cases, the FedAvg model against its own
    verdicts = result["per_site_verdict"]
    assert set(verdicts) == {"hospital-a", "hospital-b"}
    for v in verdicts.values():
        assert v["verdict"] in VERDICTS and v["federated_run"] == "fedavg"
        assert v["test_cases"] >= 1 and v["local"]["ci_low"] <= v["local"]["dice"]
    assert "## Does each hospital gain by joining?" in report
    assert (out / "per_site_verdict.png").stat().st_size > 10_000
    assert result["dp_outlook"] is None and result["reused"] == []
    # per-case values stay in the arms' own summaries, out of comparison.json
    own = json.loads((out / "local-hospital-a" / "summary.json").read_text())
    assert own["per_site"]["hospital-a"]["per_case"]
    assert "per_case" not in json.dumps(result)
    assert all((out / arm / REUSE_FILE).is_file() for arm in
               ("centralized", "local-hospital-a", "federated-fedavg", "federated-fedbn"))
    # a folder holding other files is refused (exit 1) unless --force
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a comparison")
    assert main(["compare", "--config", str(tiny_federation), "--out", str(foreign)]) == 1


def test_matched_rounds_needs_a_multiple(tiny_federation: Path) -> None:
    cfg = load_config(tiny_federation).with_changes(
        training={"epochs": 5}, federation={"local_epochs": 2}
    )
    with pytest.raises(ConfigError, match="multiple"):
        matched_rounds(cfg)
    assert matched_rounds(cfg.with_changes(training={"epochs": 6})) == (3, 2)
