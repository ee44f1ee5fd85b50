import json
from pathlib import Path

import pytest

from fedmed.config import config_from_dict, load_config
from fedmed.errors import FederationError
from fedmed.federation.rundir import RunDir

CFG = config_from_dict(
    {"modalities": ["T1"], "labels": {0: "bg", 1: "x"}, "sites": [{"name": "a", "path": "a"}]},
    root=Path("/tmp"),
)


def test_create_writes_resolved_config(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", CFG)
    assert load_config(run.path / "config.yaml").sites[0].name == "a"
    assert run.logs.is_dir()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", CFG)
    run.append_metrics({"epoch": 1})
    with pytest.raises(FederationError, match="--force"):
        RunDir.create(tmp_path / "run", CFG)
    again = RunDir.create(tmp_path / "run", CFG, force=True)
    assert again.metrics() == []


def test_resume_keeps_metrics_and_needs_a_run(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="holds no run"):
        RunDir.create(tmp_path / "empty", CFG, resume=True)
    run = RunDir.create(tmp_path / "run", CFG)
    run.append_metrics({"round": 1, "central_dice": float("nan")})
    resumed = RunDir.create(tmp_path / "run", CFG, resume=True)
    assert resumed.metrics() == [{"round": 1, "central_dice": None}]


def test_summary_contract(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", CFG)
    with pytest.raises(FederationError, match="lack"):
        run.write_summary({"mode": "centralized"})
    full = {
        "mode": "centralized", "dice_mean": 0.9, "dice_per_class": {"x": 0.9},
        "hd95_mean": float("inf"), "per_site": {}, "wall_seconds": 1.0,
    }
    run.write_summary(full)
    data = json.loads(run.summary_path.read_text())
    assert data["hd95_mean"] is None
    assert run.read_summary()["dice_mean"] == 0.9
