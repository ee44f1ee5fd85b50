"""The one training loop, and the pieces every fit shares: loss, schedule, epoch log.

Plain and DP training (:mod:`fedmed.training.dp`) run the same :class:`EpochLoop` with the
same loss builder (:func:`build_loss`), the same learning-rate schedule
(:func:`build_scheduler`, a ``torch.optim.lr_scheduler.LambdaLR``) and the same epoch
logger (:class:`EpochLogger`). They differ only in what the loop is handed: the data loader
(shuffled patches, or Poisson-sampled patients), the optimiser (the configured one, or
Opacus' ``DPOptimizer`` around it) and its step hooks (accounting, weight averaging).

Array contract: a batch is a dict with ``image`` ``(B, C, X, Y, Z)`` float32, ``label``
``(B, 1, X, Y, Z)`` int64, ``available`` ``(B, C)`` bool and ``case_index`` ``(B,)``;
``B`` may be 0 (an empty Poisson batch of DP-SGD).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.config import LossConfig, TrainingConfig

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FitResult:
    """What one call of :meth:`fedmed.training.trainer.LocalTrainer.fit` did.

    Attributes:
        loss: mean training loss over the last epoch's steps.
        steps: optimiser steps taken.
        num_cases: training cases (patients) used: the federated weight, never batches.
        seconds: wall time.
        epsilon: patient-level epsilon spent so far (DP runs), else ``None``.
        delta: the delta of ``epsilon``.
        skipped: why no update was made (e.g. privacy budget exhausted), else ``None``.
    """

    loss: float
    steps: int
    num_cases: int
    seconds: float
    epsilon: float | None = None
    delta: float | None = None
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def build_loss(
    loss: LossConfig, device: torch.device | str, *, per_sample: bool = False
) -> LossFn:
    """Dice + cross-entropy (MONAI ``DiceCELoss``): logits ``(B, K, ...)``, labels ``(B, 1, ...)``.

    Args:
        loss: the weights of the two terms and the per-class cross-entropy weights.
        device: where the class weights live.
        per_sample: ``True``: the mean of per-sample losses (Dice per sample), which DP-SGD
            needs: a pooled Dice (``False``, the default for plain training) makes one
            patient's gradient depend on the others' data and breaks the per-example
            sensitivity bound.
    """
    from monai.losses import DiceCELoss

    weight = (
        torch.tensor(loss.class_weights, dtype=torch.float32, device=device)
        if loss.class_weights is not None
        else None
    )
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        lambda_dice=loss.dice_weight,
        lambda_ce=loss.ce_weight,
        weight=weight,
        batch=not per_sample,
    )


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the planned training."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    training: TrainingConfig,
    *,
    steps_per_epoch: int,
    start_epoch: int,
    total_epochs: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule over the whole run, resumed at ``start_epoch``.

    Optimiser step ``k`` of this fit uses ``learning_rate * lr_factor(schedule, s / S)``
    with ``s = start_epoch * steps_per_epoch + k`` and ``S = total_epochs *
    steps_per_epoch``, so a federated round continues the run's schedule where the last
    one stopped. Step the scheduler once after every optimiser step.

    The base learning rate is set from ``training`` even when the optimiser's state was
    restored from an earlier round (whose last learning rate it carries).
    """
    first = start_epoch * steps_per_epoch
    total = max(1, total_epochs * steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = training.learning_rate

    def factor(k: int) -> float:
        return lr_factor(training.schedule, (first + k) / total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def proximal_term(model: nn.Module, reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum ||w - w_ref||^2`` over the trainable parameters named in ``reference`` (FedProx)."""
    terms = [
        (p - reference[name]).pow(2).sum()
        for name, p in model.named_parameters()
        if p.requires_grad and name in reference
    ]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


class EpochLogger:
    """Appends one JSON line per epoch to ``metrics.jsonl`` (nothing without a path).

    Args:
        path: the metrics file, or ``None``.
        site: written into every line (``None`` for pooled training).
        on_line: also called with every line (run tracking), or ``None``.
    """

    def __init__(
        self, path: Path | None, site: str | None,
        on_line: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        self.site = site
        self.on_line = on_line

    def log(self, **fields: Any) -> None:
        """Write ``fields`` (those that are not ``None``) with the site as one line."""
        line = {"site": self.site, **{k: v for k, v in fields.items() if v is not None}}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        if self.on_line is not None:
            self.on_line(line)


def progress_bar(enabled: bool) -> Any:
    """A transient rich progress bar (disabled: a silent stand-in)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


@dataclass
class EpochLoop:
    """One loop for every fit: forward, loss, backward, optimiser step, schedule, log.

    Attributes:
        model: the module to run (Opacus' ``GradSampleModule`` for DP-SGD).
        loss_fn: from :func:`build_loss`.
        optimizer: the optimiser (Opacus' ``DPOptimizer`` for DP-SGD).
        scheduler: from :func:`build_scheduler`, stepped after every optimiser step.
        loader: batches of one epoch (sized; iterated once per epoch).
        set_epoch: called with the global epoch index before each epoch (patch draws).
        logger: the epoch log.
        device: where batches go.
        scaler: AMP gradient scaler (disabled: plain backward and step).
        autocast: context of the forward pass (mixed precision on CUDA).
        accumulate: batches per optimiser step.
        penalty: extra loss term on the model (FedProx's proximal term), or ``None``.
        before_step: called with the last batch before each optimiser step.
        after_step: called after each optimiser step.
        log_fields: extra fields of every epoch line.
        label: progress-bar label.
        progress: show a progress bar.
        round_index: federated round, written into epoch lines.
        num_cases: training cases, written into epoch lines.
    """

    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Iterable[Batch]
    set_epoch: Callable[[int], None]
    logger: EpochLogger
    device: torch.device
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    accumulate: int = 1
    penalty: Callable[[], torch.Tensor] | None = None
    before_step: Callable[[Batch], None] | None = None
    after_step: Callable[[], None] | None = None
    log_fields: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    progress: bool = False
    round_index: int | None = None
    num_cases: int | None = None
    steps_taken: int = field(default=0, init=False)
    last_lr: float = field(default=math.nan, init=False)

    def run(self, epochs: int, start_epoch: int) -> float:
        """Train ``epochs`` epochs numbered from ``start_epoch``; the last epoch's mean loss."""
        per_epoch = len(self.loader)  # type: ignore[arg-type]
        epoch_loss = math.nan
        self.model.train()
        with progress_bar(self.progress and epochs * per_epoch > 1) as bar:
            task = bar.add_task(self.label, total=epochs * per_epoch)
            for epoch in range(start_epoch, start_epoch + epochs):
                started = time.perf_counter()
                self.set_epoch(epoch)
                losses = self._epoch(per_epoch, bar, task, f"{self.label} epoch {epoch + 1}")
                epoch_loss = float(np.mean(losses)) if losses else math.nan
                self.logger.log(
                    epoch=epoch + 1, loss=epoch_loss, round_index=self.round_index,
                    lr=self.last_lr, seconds=time.perf_counter() - started,
                    cases=self.num_cases, **self.log_fields,
                )
        return epoch_loss

    def _epoch(self, per_epoch: int, bar: Any, task: Any, label: str) -> list[float]:
        losses: list[float] = []
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(self.loader):
            if len(batch["case_index"]):  # an empty Poisson batch has nothing to learn from
                losses.append(self._backward(batch))
            if (i + 1) % self.accumulate == 0 or i + 1 == per_epoch:
                self._step(batch)
            shown = f"{label} loss {np.mean(losses):.3f}" if losses else label
            bar.update(task, advance=1, description=shown)
        return losses

    def _backward(self, batch: Batch) -> float:
        x = batch["image"].to(self.device, non_blocking=True)
        available = batch["available"].to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.model(x, available)
            loss = self.loss_fn(logits.float(), batch["label"].to(self.device))
            if self.penalty is not None:
                loss = loss + self.penalty()
        self.scaler.scale(loss / self.accumulate).backward()
        return float(loss.detach())

    def _step(self, batch: Batch) -> None:
        if self.before_step is not None:
            self.before_step(batch)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step is not None:
            self.after_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
