"""Run tracking: what metrics.jsonl holds, TensorBoard and MLflow hold too.

Read back with the tools' own readers: TensorBoard's ``EventAccumulator`` and MLflow's
``MlflowClient``. The runs are real: ``fedmed simulate`` on the tiny two-site federation of
the federation tests (2 rounds), and the centralized baseline on the same data.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from fedmed.cli.main import main as cli_main
from fedmed.config import load_config
from fedmed.errors import ConfigError
from fedmed.export.tracking import (
    MLFLOW_DIR,
    MLFLOW_RUN_ID_FILE,
    TB_DIR,
    RunTracker,
    TensorBoardWriter,
    default_mlflow_uri,
    open_tracker,
    scalars,
    shared_mlflow_store,
    with_tracking,
)
from tests.support.federations import make_federation

HIDDEN = ("tensorboard", "torch.utils.tensorboard", "mlflow")


def _federation(root: Path, **sections: Any) -> Path:
    return make_federation(
        root, sites=("a", "b"), cases=4, shift_step=0.5, secure=False,
        federation={"rounds": 2, "min_train_sites": 1, "min_available_sites": 2,
                    "evaluate_sites": True},
        **sections,
    )


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _tb_series(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _f32(values: list[float]) -> list[float]:
    """TensorBoard keeps scalars as float32."""
    return [float(np.float32(v)) for v in values]


# -- a real federated run ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_simulate_run_lands_in_tensorboard_and_mlflow(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    config = _federation(tmp_path)
    out = tmp_path / "runs" / "fed"
    args = ["simulate", "--config", str(config), "--out", str(out)]
    mlflow = _installed("mlflow")
    assert cli_main(args + (["--tracking", "mlflow"] if mlflow else [])) == 0

    lines = _lines(out)
    assert [ln["round"] for ln in lines] == [1, 2]
    central = [ln["central_dice"] for ln in lines]
    assert all(0.0 <= d <= 1.0 for d in central)

    acc = _events(out / TB_DIR)
    tags = set(acc.Tags()["scalars"])
    assert {"central_dice", "central_dice_per_class/blob", "per_site_dice/a",
            "per_site_dice/b", "train_loss", "bytes_sent", "bytes_received",
            "round_seconds", "final/dice_mean"} <= tags
    # TensorBoard's own reader gives metrics.jsonl's central Dice, round by round.
    assert _tb_series(acc, "central_dice") == list(zip([1, 2], _f32(central), strict=True))
    for tag, key, sub in [("per_site_dice/a", "per_site_dice", "a"),
                          ("central_dice_per_class/blob", "central_dice_per_class", "blob")]:
        assert _tb_series(acc, tag) == list(
            zip([1, 2], _f32([ln[key][sub] for ln in lines]), strict=True))
    assert _tb_series(acc, "bytes_sent") == [(r, float(ln["bytes_sent"]))
                                             for r, ln in zip([1, 2], lines, strict=True)]
    summary = json.loads((out / "summary.json").read_text())
    assert _tb_series(acc, "final/dice_mean") == [(2, float(np.float32(summary["dice_mean"])))]

    if not mlflow:
        pytest.skip("mlflow is not installed (pip install 'fedmed[tracking]'); TensorBoard passed")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_mlflow_uri(out / MLFLOW_DIR))
    run_id = (out / MLFLOW_RUN_ID_FILE).read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fed"
    assert run.data.tags["fedmed.mode"] == "federated"
    assert run.data.params["federation.rounds"] == "2"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    # MLflow keeps doubles: exactly the figures of metrics.jsonl.
    assert history("central_dice") == list(zip([1, 2], central, strict=True))
    assert history("per_site_dice/b") == [(r, ln["per_site_dice"]["b"])
                                          for r, ln in zip([1, 2], lines, strict=True)]
    assert history("train_loss") == [(r, ln["train_loss"])
                                     for r, ln in zip([1, 2], lines, strict=True)]
    assert history("final/dice_mean") == [(2, summary["dice_mean"])]


# -- the baselines ----------------------------------------------------------------------------


@pytest.mark.slow
def test_centralized_epochs_land_in_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from fedmed.evaluation.baselines import run_pooled

    cfg = load_config(_federation(tmp_path))
    out = tmp_path / "runs" / "central"
    summary = run_pooled(cfg, out, epochs=2, console=Console(file=io.StringIO()))

    lines = _lines(out)
    assert [ln["epoch"] for ln in lines] == [1, 2]
    acc = _events(out / TB_DIR)
    for key in ("loss", "lr", "seconds", "cases"):
        assert _tb_series(acc, key) == list(zip([1, 2], _f32([ln[key] for ln in lines]),
                                                strict=True)), key
    assert _tb_series(acc, "final/dice_mean") == [(2, float(np.float32(summary["dice_mean"])))]
    assert "final/dice_per_class/blob" in acc.Tags()["scalars"]
    # the resolved config, under the Text tab
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])


@pytest.mark.slow
def test_runs_without_the_tracking_packages(tmp_path: Path, monkeypatch: Any) -> None:
    """Packages hidden: one clear line per missing backend, the run itself unharmed."""
    from fedmed.evaluation.baselines import run_pooled

    # `import x` raises ImportError when sys.modules["x"] is None (submodules too).
    loaded = [m for m in sys.modules if any(m.startswith(h + ".") for h in HIDDEN)]
    for name in {*HIDDEN, *loaded}:
        monkeypatch.setitem(sys.modules, name, None)
    cfg = with_tracking(load_config(_federation(tmp_path)), ["tensorboard", "mlflow"])
    out = tmp_path / "run"
    text = io.StringIO()
    summary = run_pooled(cfg, out, epochs=1, console=Console(file=text, width=300))

    assert summary["mode"] == "centralized" and len(_lines(out)) == 1
    assert not (out / TB_DIR).exists() and not (out / MLFLOW_RUN_ID_FILE).exists()
    notes = [s for s in text.getvalue().splitlines() if s.startswith("run tracking:")]
    assert len(notes) == 2
    assert "TensorBoard is not installed" in notes[0] and "MLflow is not installed" in notes[1]
    assert all("pip install 'fedmed[tracking]'" in n for n in notes)


# -- the pieces -------------------------------------------------------------------------------


def test_scalars_flatten_a_metrics_line() -> None:
    line = {"round": 3, "central_dice": 0.5, "central_dice_per_class": {"CSF": 0.25},
            "per_site_dice": {"a": 0.4, "b": None}, "epsilon": {"a": 1.5}, "bytes_sent": 10,
            "sites_trained": ["a"], "secure_aggregation": True, "train_loss": float("nan"),
            "site": None}
    assert scalars(line) == {
        "central_dice": 0.5, "central_dice_per_class/CSF": 0.25, "per_site_dice/a": 0.4,
        "epsilon/a": 1.5, "bytes_sent": 10.0,
    }
    assert scalars({"dice_mean": 0.7, "rounds": 2}, "final/") == {
        "final/dice_mean": 0.7, "final/rounds": 2.0}


def test_tracking_config_and_command_line(tmp_path: Path) -> None:
    cfg = load_config(_federation(tmp_path))
    assert cfg.tracking.tensorboard and not cfg.tracking.mlflow
    on = with_tracking(cfg, ["mlflow"])
    assert on.tracking.tensorboard and on.tracking.mlflow and on.tracking.mlflow_uri is None
    server = with_tracking(cfg, None, "http://mlflow.example:5000")
    assert server.tracking.mlflow and server.tracking.mlflow_uri == "http://mlflow.example:5000"
    off = with_tracking(on, ["none"])
    assert not off.tracking.tensorboard and not off.tracking.mlflow
    with pytest.raises(ConfigError, match="unknown"):
        with_tracking(cfg, ["wandb"])
    with pytest.raises(ConfigError, match="none"):
        with_tracking(cfg, ["none", "mlflow"])
    with pytest.raises(ConfigError, match="mlflow_uri"):
        with_tracking(cfg, None, "just/a/path")
    with pytest.raises(ConfigError, match="tracking"):
        cfg.with_changes(tracking={"wandb": True})  # unknown keys are errors
    # fedmed compare: one store for all approaches, unless a URI is given.
    shared = shared_mlflow_store(on, tmp_path / "cmp")
    assert shared.tracking.mlflow_uri == default_mlflow_uri(tmp_path / "cmp" / MLFLOW_DIR)
    assert shared_mlflow_store(server, tmp_path / "cmp") is server
    assert shared_mlflow_store(cfg, tmp_path / "cmp") is cfg
    # The CLI: a bad choice is invalid input (exit 1), before anything runs.
    out = tmp_path / "never"
    assert cli_main(["simulate", "--config", str(tmp_path / "federation.yaml"), "--out",
                     str(out), "--tracking", "wandb"]) == 1
    assert not out.exists()


def test_tracking_never_travels_to_the_sites(tmp_path: Path) -> None:
    from fedmed.federation.protocol import config_for_site, config_json
    from fedmed.federation.site import simulated_sites

    cfg = with_tracking(load_config(_federation(tmp_path)), ["mlflow"],
                        "https://user:secret@mlflow.example")
    plan = config_json(cfg)
    assert "tracking" not in json.loads(plan) and "secret" not in plan
    spec = simulated_sites(cfg)[0]
    site_cfg = config_for_site(plan, spec)  # the site accepts the plan
    assert site_cfg.tracking == type(cfg.tracking)()


def test_a_failing_writer_is_dropped_and_the_run_goes_on() -> None:
    class Broken:
        name = "MLflow"

        def scalars(self, values: Any, step: int) -> None:
            raise ConnectionError("tracking server\ngone")

        def close(self, ok: bool) -> None:
            raise AssertionError("a dropped writer is not closed")

    class Kept:
        name = "TensorBoard"

        def __init__(self) -> None:
            self.logged: list[tuple[int, dict[str, float]]] = []
            self.closed: bool | None = None

        def scalars(self, values: Any, step: int) -> None:
            self.logged.append((step, dict(values)))

        def close(self, ok: bool) -> None:
            self.closed = ok

    notes: list[str] = []
    kept = Kept()
    tracker = RunTracker([Broken(), kept], notes.append)
    with pytest.raises(RuntimeError), tracker:
        tracker.log_line({"round": 1, "central_dice": 0.5}, step=1)
        tracker.log_line({"round": 2, "central_dice": 0.6}, step=2)
        raise RuntimeError("the run fails")
    assert kept.logged == [(1, {"central_dice": 0.5}), (2, {"central_dice": 0.6})]
    assert kept.closed is False  # the run failed
    assert notes == ["run tracking: MLflow stopped logging (tracking server gone); "
                     "the run goes on without it"]
    assert tracker.backends == []


def test_resumed_run_purges_the_rounds_a_crash_left_behind(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    first = TensorBoardWriter(tmp_path, config_text="name: x\n")
    for step in (1, 2, 3):  # round 3 was logged, but its checkpoint never written
        first.scalars({"central_dice": step / 10}, step)
    first.close(ok=False)
    # a resumed run is a later process: its event file sorts after the first (TensorBoard
    # orders files by the creation second in their names, then by a per-process counter
    # whose digits do not sort numerically)
    time.sleep(1.1)
    again = TensorBoardWriter(tmp_path, start_step=3)
    again.scalars({"central_dice": 0.35}, 3)
    again.close(ok=True)
    assert _tb_series(_events(tmp_path), "central_dice") == list(
        zip([1, 2, 3], _f32([0.1, 0.2, 0.35]), strict=True))


def test_open_tracker_follows_the_config(tmp_path: Path) -> None:
    cfg = with_tracking(load_config(_federation(tmp_path)), ["none"])
    tracker = open_tracker(cfg, tmp_path / "run", mode="federated")
    assert tracker.backends == []
    tracker.log_line({"round": 1, "central_dice": 0.5}, step=1)  # a no-op
    tracker.close()
    assert not (tmp_path / "run").exists()


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
