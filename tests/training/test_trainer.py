import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.errors import TrainingError
from fedmed.models import build_model
from fedmed.training.loop import lr_factor, proximal_term
from fedmed.training.trainer import LocalTrainer, seed_everything
from tests.support.toy import toy_cases, toy_config


def make_trainer(tmp_path: Path, **sections) -> LocalTrainer:
    cfg = toy_config(tmp_path, **sections)
    seed_everything(cfg.training.seed)
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    return LocalTrainer(cfg, model, device="cpu", metrics_path=tmp_path / "metrics.jsonl")


def test_loss_falls_and_metrics_lines_are_written(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, training={"epochs": 6})
    result = trainer.fit(toy_cases(4), epochs=6)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    losses = [float(__import__("json").loads(s)["loss"]) for s in lines]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]
    assert result.num_cases == 4 and result.steps == 6 * 4  # 4 cases x 2 patches / batch 2
    ev = trainer.evaluate(toy_cases(2, seed=9))
    assert set(ev.dice_per_class) == {"ball"}
    assert ev.dice_mean > 0.5


def test_same_seed_same_weights(tmp_path: Path) -> None:
    weights = []
    for run in range(2):
        trainer = make_trainer(tmp_path / str(run))
        trainer.fit(toy_cases(3), epochs=1)
        weights.append(trainer.get_weights())
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    other = make_trainer(tmp_path / "other", training={"seed": 1})
    other.fit(toy_cases(3), epochs=1)
    assert any(not torch.equal(weights[0][k], v) for k, v in other.get_weights().items())


def test_fedprox_term_pulls_towards_reference(tmp_path: Path) -> None:
    distances = {}
    for mu in (0.0, 50.0):
        trainer = make_trainer(tmp_path / str(mu))
        reference = trainer.get_weights()
        trainer.fit(toy_cases(3), epochs=2, reference=reference, mu=mu)
        after = trainer.get_weights()
        distances[mu] = sum(float((after[k] - reference[k]).pow(2).sum()) for k in reference)
    assert distances[50.0] < 0.5 * distances[0.0]


def test_proximal_term_matches_definition() -> None:
    model = torch.nn.Linear(3, 2)
    ref = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    expected = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    assert float(proximal_term(model, ref).detach()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        ("cosine", 0.0, 1.0),
        ("cosine", 0.5, 0.5),
        ("cosine", 1.0, 0.0),
        ("poly", 0.0, 1.0),
        ("poly", 1.0, 0.0),
        ("constant", 0.7, 1.0),
    ],
)
def test_lr_schedules(schedule: str, progress: float, expected: float) -> None:
    assert lr_factor(schedule, progress) == pytest.approx(expected, abs=1e-9)


def test_fusion_trains_and_predicts_without_flair(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, model={"architecture": "fusion", "modality_dropout": 0.3}, training={"epochs": 4}
    )
    cases = toy_cases(2) + toy_cases(2, seed=3, flair=False)
    trainer.fit(cases, epochs=4)
    case = toy_cases(1, seed=5, flair=False)[0]
    a = trainer.predict(case.image, case.available)
    garbage = case.image.copy()
    garbage[1] = np.random.default_rng(0).normal(size=garbage[1].shape)
    b = trainer.predict(garbage, case.available)
    assert np.array_equal(a, b)  # the missing modality's content is ignored
    assert a.shape == case.image.shape[1:]


def test_fit_rejects_bad_input(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    with pytest.raises(TrainingError, match="no training cases"):
        trainer.fit([], epochs=1)
    unlabelled = toy_cases(1)[0]
    object.__setattr__(unlabelled, "label", None)
    with pytest.raises(TrainingError, match="without a label"):
        trainer.fit([unlabelled], epochs=1)
    with pytest.raises(TrainingError, match="no labelled cases"):
        trainer.evaluate([unlabelled])


def test_set_weights_names_mismatches(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    w = trainer.get_weights()
    k = next(iter(w))
    with pytest.raises(TrainingError, match="missing"):
        trainer.set_weights({kk: v for kk, v in w.items() if kk != k})
    bad = dict(w)
    bad[k] = torch.zeros(7)
    with pytest.raises(TrainingError, match="shape"):
        trainer.set_weights(bad)
    assert not math.isnan(float(next(iter(w.values())).float().sum()))


def test_optimizer_state_is_kept_between_rounds(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path)
    seed_everything(0)
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    kept = tmp_path / "state" / "optimizer-run.pt"
    trainer = LocalTrainer(cfg, model, device="cpu", optimizer_state=kept)
    first = trainer.fit(toy_cases(3), epochs=1, round_index=1, total_epochs=2)
    saved = torch.load(kept, weights_only=True)
    assert saved["round"] == 1
    steps = [int(s["step"]) for s in saved["optimizer"]["state"].values()]
    assert steps and all(s == first.steps for s in steps)

    trainer.fit(toy_cases(3), epochs=1, round_index=2, start_epoch=1, total_epochs=2)
    resumed = torch.load(kept, weights_only=True)
    assert resumed["round"] == 2
    # AdamW's step counts continued from round 1 instead of starting again
    assert all(int(s["step"]) == 2 * first.steps for s in resumed["optimizer"]["state"].values())

    # a round re-run after a restart must not load moments from its own (or a later) round
    trainer.fit(toy_cases(3), epochs=1, round_index=2, start_epoch=1, total_epochs=2)
    again = torch.load(kept, weights_only=True)
    assert all(int(s["step"]) == first.steps for s in again["optimizer"]["state"].values())
