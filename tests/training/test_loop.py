"""The one training loop: plain and DP-SGD fits share the schedule, the loss builder, the log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import fedmed.training.trainer as trainer_module
from fedmed.models import build_model
from fedmed.training.loop import build_loss, build_scheduler, lr_factor
from fedmed.training.trainer import LocalTrainer, seed_everything
from tests.support.toy import toy_cases, toy_config

LR = 1e-2


def _trainer(tmp_path: Path, private: bool, schedule: str = "cosine") -> LocalTrainer:
    # 4 cases: plain = 4 x 2 patches / batch 2 = 4 steps per epoch;
    # DP = ceil(1 / q) with q = 1 / 4 = 4 steps per epoch
    cfg = toy_config(
        tmp_path,
        training={"schedule": schedule, "learning_rate": LR},
        privacy={"enabled": private, "noise_multiplier": 1.0, "target_epsilon": None,
                 "expected_batch_size": 1},
    )
    seed_everything(0)
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    return LocalTrainer(cfg, model, device="cpu", site="a", state_dir=tmp_path / "state",
                        metrics_path=tmp_path / "metrics.jsonl")


def _record_lrs(trainer: LocalTrainer) -> list[float]:
    """The learning rate of every optimiser step the trainer takes."""
    lrs: list[float] = []
    make = trainer.make_optimizer

    def recording(params: Any) -> torch.optim.Optimizer:
        opt = make(params)

        class Recording(type(opt)):  # type: ignore[misc]
            def step(self, closure: Any = None) -> Any:
                lrs.append(float(self.param_groups[0]["lr"]))
                return super().step(closure)

        opt.__class__ = Recording
        return opt

    trainer.make_optimizer = recording  # type: ignore[method-assign]
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_plain_and_dp_fits_follow_the_same_schedule(tmp_path: Path, schedule: str) -> None:
    per_step: dict[bool, list[float]] = {}
    per_epoch: dict[bool, list[float]] = {}
    for private in (False, True):
        folder = tmp_path / str(private)
        trainer = _trainer(folder, private, schedule)
        lrs = _record_lrs(trainer)
        # a federated round: epochs 2 and 3 of a 4-epoch run
        res = trainer.fit(toy_cases(4), 2, start_epoch=1, total_epochs=4, round_index=2)
        assert res.steps == 8 and (res.epsilon is not None) == private
        per_step[private] = lrs
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [x["epoch"] for x in lines] == [2, 3]
        per_epoch[private] = [x["lr"] for x in lines]
    expected = [LR * lr_factor(schedule, s / 16) for s in range(4, 12)]
    assert per_step[False] == expected
    assert per_step[True] == expected
    # each epoch line reports the learning rate of its last step
    assert per_epoch[False] == per_epoch[True] == [expected[3], expected[7]]


def test_plain_and_dp_fits_build_their_loss_with_the_shared_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []

    def spy(*args: Any, per_sample: bool = False, **kwargs: Any) -> Any:
        calls.append(per_sample)
        return build_loss(*args, per_sample=per_sample, **kwargs)

    monkeypatch.setattr(trainer_module, "build_loss", spy)
    for private in (False, True):
        trainer = _trainer(tmp_path / str(private), private)
        trainer.fit(toy_cases(2), 1)
    # plain training pools Dice over the batch; DP-SGD needs per-patient losses
    assert calls == [False, True]


def test_per_sample_loss_is_the_mean_of_per_patient_losses() -> None:
    cfg = toy_config(Path("."))
    torch.manual_seed(0)
    labels = torch.zeros(3, 1, 8, 8, 8, dtype=torch.long)
    labels[0, :, :4] = 1  # a large structure, a small one, none: pooled Dice differs
    labels[1, :, :1, :2] = 1
    logits = torch.randn(3, 2, 8, 8, 8) + 2.0 * torch.cat([1 - labels, labels], 1)
    per_sample = build_loss(cfg.training.loss, "cpu", per_sample=True)
    pooled = build_loss(cfg.training.loss, "cpu")
    singles = [float(pooled(logits[i : i + 1], labels[i : i + 1])) for i in range(3)]
    assert float(per_sample(logits, labels)) == pytest.approx(sum(singles) / 3, rel=1e-5)
    assert float(pooled(logits, labels)) != pytest.approx(sum(singles) / 3, rel=1e-3)


def test_a_resumed_schedule_continues_the_run() -> None:
    cfg = toy_config(Path("."), training={"schedule": "cosine", "learning_rate": LR})

    def lrs(start_epoch: int, steps: int, saved_lr: float | None = None) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        if saved_lr is not None:  # optimiser state restored from a round that ended here
            opt.param_groups[0]["lr"] = saved_lr
        sched = build_scheduler(opt, cfg.training, steps_per_epoch=3, start_epoch=start_epoch,
                                total_epochs=4)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    whole = lrs(0, 12)
    assert whole[0] == LR and whole[6] == pytest.approx(LR / 2)
    assert whole[-1] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 11 / 12)))
    assert lrs(2, 6) == whole[6:]
    assert lrs(2, 6, saved_lr=whole[5]) == whole[6:]
