"""The local trainer: one implementation for every mode (site, site alone, pooled data).

:class:`LocalTrainer` trains a network on preprocessed cases (patches, Dice + CE loss,
AdamW/SGD, cosine/poly schedule, AMP on CUDA, gradient accumulation, optional FedProx
proximal term), evaluates whole volumes with sliding-window inference, and predicts label
maps. With ``privacy.enabled`` the fit is delegated to :func:`fedmed.training.dp.fit_private`
(patient-level DP-SGD). It knows nothing of Flower.

Array contract: cases are :class:`~fedmed.data.preprocess.PreprocessedCase` (image
``(C, X, Y, Z)`` float32, label ``(1, X, Y, Z)``); batches add ``B``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmed.config import FederationConfig, PrivacyConfig
from fedmed.errors import TrainingError
from fedmed.training.metrics import EvalResult, case_metrics, summarize

if TYPE_CHECKING:
    from fedmed.data.preprocess import PreprocessedCase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """What one call of :meth:`LocalTrainer.fit` did.

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


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``.

    Raises:
        TrainingError: ``cuda`` was asked for but no CUDA device is present.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is reproducible on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the planned training."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    return 1.0


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


class LocalTrainer:
    """Trains, evaluates and predicts with one network.

    Args:
        cfg: the federation config (``training``, ``preprocessing``, labels, modalities).
        model: the network (built by :func:`fedmed.models.build_model`).
        device: overrides ``cfg.training.device``.
        metrics_path: ``metrics.jsonl`` to append one line per epoch to.
        site: site name written into metric lines and used by the DP ledger.
        privacy: the site's DP settings; default ``cfg.privacy_for(site)`` or ``cfg.privacy``.
        state_dir: where a site keeps state across rounds and restarts (DP ledger).
        run_id: identifies the federated run in the ledger.
        optimizer_state: file where :meth:`fit` keeps the optimiser's state between calls
            (a site's moments across federated rounds); ``None``: a fresh optimiser per fit.
    """

    def __init__(
        self,
        cfg: FederationConfig,
        model: nn.Module,
        *,
        device: str | torch.device | None = None,
        metrics_path: Path | None = None,
        site: str | None = None,
        privacy: PrivacyConfig | None = None,
        state_dir: Path | None = None,
        run_id: str = "run",
        optimizer_state: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.training = cfg.training
        self.device = (
            torch.device(device) if device is not None else select_device(cfg.training.device)
        )
        self.model = model.to(self.device)
        self.metrics_path = metrics_path
        self.site = site
        if privacy is None:
            privacy = cfg.privacy_for(site) if site in cfg.site_names else cfg.privacy
        self.privacy = privacy
        self.state_dir = state_dir
        self.run_id = run_id
        self.optimizer_state = optimizer_state
        self.loss_fn = self._make_loss()
        self._progress_epoch = 0

    # -- building blocks (also used by fedmed.training.dp) --------------------------------

    def _make_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        from monai.losses import DiceCELoss

        lc = self.training.loss
        weight = (
            torch.tensor(lc.class_weights, dtype=torch.float32, device=self.device)
            if lc.class_weights is not None
            else None
        )
        return DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lc.dice_weight,
            lambda_ce=lc.ce_weight,
            weight=weight,
            batch=True,
        )

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The optimiser the config asks for, over ``params``."""
        t = self.training
        if t.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=t.learning_rate,
                momentum=t.momentum,
                weight_decay=t.weight_decay,
                nesterov=True,
            )
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)

    def autocast(self) -> Any:
        """Mixed-precision context on CUDA (bf16 where supported), a no-op on CPU."""
        if self.device.type == "cuda" and self.training.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    def patch_dataset(self, cases: list[PreprocessedCase], seed: int, train: bool = True) -> Any:
        """The patch dataset over ``cases`` (see :class:`fedmed.data.dataset.PatchDataset`)."""
        from fedmed.data.dataset import PatchDataset

        return PatchDataset(
            cases, self.cfg.preprocessing, self.cfg.num_classes, seed=seed, train=train
        )

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch dict (``image``, ``available``)."""
        x = batch["image"].to(self.device, non_blocking=True)
        avail = batch["available"].to(self.device, non_blocking=True)
        return self.model(x, avail)

    # -- training --------------------------------------------------------------------------

    def fit(
        self,
        cases: list[PreprocessedCase],
        epochs: int,
        *,
        reference: Mapping[str, torch.Tensor] | None = None,
        mu: float = 0.0,
        start_epoch: int = 0,
        total_epochs: int | None = None,
        round_index: int | None = None,
        seed: int | None = None,
    ) -> FitResult:
        """Train on ``cases`` for ``epochs`` passes.

        Args:
            cases: training cases (preprocessed, labelled).
            epochs: passes over the cases (each visits every case ``patches_per_case`` times).
            reference: weights of the FedProx proximal term (the round's global weights).
            mu: proximal coefficient; 0 disables the term.
            start_epoch: global epoch index of the first epoch (for the LR schedule across
                federated rounds, and for reproducible sampling).
            total_epochs: planned epochs of the whole run (schedule length); default
                ``start_epoch + epochs``.
            round_index: federated round, written into metric lines.
            seed: sampling seed; default ``training.seed``.

        Returns:
            :class:`FitResult` with ``num_cases = len(cases)``.

        Raises:
            TrainingError: no cases, or a case without a label.
        """
        if not cases:
            raise TrainingError(f"site {self.site or '(pooled)'}: no training cases to fit on")
        missing = [c.case_id for c in cases if c.label is None]
        if missing:
            raise TrainingError(f"cases without a label cannot be trained on: {missing[:5]}")
        if self.privacy.enabled:
            from fedmed.training.dp import fit_private

            return fit_private(
                self,
                cases,
                epochs,
                start_epoch=start_epoch,
                total_epochs=total_epochs,
                round_index=round_index,
                reference=reference,
                mu=mu,
            )
        return self._fit_plain(
            cases,
            epochs,
            reference=reference,
            mu=mu,
            start_epoch=start_epoch,
            total_epochs=total_epochs or start_epoch + epochs,
            round_index=round_index,
            seed=self.training.seed if seed is None else seed,
        )

    def _fit_plain(
        self,
        cases: list[PreprocessedCase],
        epochs: int,
        *,
        reference: Mapping[str, torch.Tensor] | None,
        mu: float,
        start_epoch: int,
        total_epochs: int,
        round_index: int | None,
        seed: int,
    ) -> FitResult:
        t = self.training
        started = time.perf_counter()
        ref = (
            {k: v.detach().to(self.device) for k, v in reference.items()}
            if reference is not None and mu > 0
            else None
        )
        dataset = self.patch_dataset(cases, seed=seed, train=True)
        gen = torch.Generator().manual_seed(seed + 7919 * start_epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=t.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=t.num_workers,
            drop_last=len(dataset) >= t.batch_size,
            persistent_workers=False,
        )
        optimizer = self.make_optimizer(self.model.parameters())
        self._restore_optimizer(optimizer, round_index)
        scaler = torch.amp.GradScaler(
            "cuda",
            enabled=self.device.type == "cuda" and t.amp and not torch.cuda.is_bf16_supported(),
        )
        steps_per_epoch = max(1, len(loader) // t.accumulate)
        total_steps = max(1, total_epochs * steps_per_epoch)
        step = start_epoch * steps_per_epoch
        self.model.train()
        epoch_loss = math.nan
        taken = 0
        with _progress(t.progress and epochs * len(loader) > 1) as bar:
            task = bar.add_task(self._label(round_index), total=epochs * len(loader))
            for e in range(epochs):
                epoch = start_epoch + e
                dataset.set_epoch(epoch)
                ep_started = time.perf_counter()
                losses: list[float] = []
                optimizer.zero_grad(set_to_none=True)
                for i, batch in enumerate(loader):
                    with self.autocast():
                        logits = self.forward(batch)
                        loss = self.loss_fn(logits.float(), batch["label"].to(self.device))
                        if ref is not None:
                            loss = loss + 0.5 * mu * proximal_term(self.model, ref)
                    scaler.scale(loss / t.accumulate).backward()
                    losses.append(float(loss.detach()))
                    if (i + 1) % t.accumulate == 0 or i + 1 == len(loader):
                        for g in optimizer.param_groups:
                            g["lr"] = t.learning_rate * lr_factor(t.schedule, step / total_steps)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        taken += 1
                    bar.update(
                        task,
                        advance=1,
                        description=f"{self._label(round_index)} "
                        f"epoch {epoch + 1} loss {np.mean(losses):.3f}",
                    )
                epoch_loss = float(np.mean(losses)) if losses else math.nan
                self._log_epoch(
                    epoch=epoch + 1,
                    loss=epoch_loss,
                    round_index=round_index,
                    lr=optimizer.param_groups[0]["lr"],
                    seconds=time.perf_counter() - ep_started,
                    cases=len(cases),
                )
        self._keep_optimizer(optimizer, round_index)
        return FitResult(
            loss=epoch_loss,
            steps=taken,
            num_cases=len(cases),
            seconds=time.perf_counter() - started,
        )

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer, round_index: int | None) -> None:
        """Load the moments kept by an earlier fit.

        Only from an earlier round: a round re-run after a restart must not see its future.
        """
        path = self.optimizer_state
        if path is None or not path.is_file():
            return
        kept = torch.load(path, map_location=self.device, weights_only=True)
        if round_index is not None and int(kept.get("round", 0)) >= round_index:
            return
        try:
            optimizer.load_state_dict(kept["optimizer"])
        except (KeyError, ValueError) as err:
            log.warning("ignoring optimiser state %s that does not fit this model: %s", path, err)

    def _keep_optimizer(self, optimizer: torch.optim.Optimizer, round_index: int | None) -> None:
        path = self.optimizer_state
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"round": round_index or 0, "optimizer": optimizer.state_dict()}, tmp)
        tmp.replace(path)

    def _label(self, round_index: int | None) -> str:
        who = self.site or "pooled"
        return f"{who} round {round_index}" if round_index is not None else who

    def _log_epoch(self, **fields: Any) -> None:
        line = {"site": self.site, **{k: v for k, v in fields.items() if v is not None}}
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict_logits(
        self, image: np.ndarray | torch.Tensor, available: np.ndarray
    ) -> torch.Tensor:
        """Sliding-window logits ``(K, X, Y, Z)`` for one preprocessed image ``(C, X, Y, Z)``."""
        from monai.inferers import sliding_window_inference

        self.model.eval()
        # np.array copies: cached cases are read-only memory maps.
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None].to(self.device)
        avail = torch.as_tensor(np.asarray(available), dtype=torch.bool)[None].to(self.device)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            return self.model(patch, avail.expand(patch.shape[0], -1))

        with self.autocast():
            logits = sliding_window_inference(
                x,
                roi_size=self.cfg.preprocessing.patch_size,
                sw_batch_size=self.training.sw_batch_size,
                predictor=predictor,
                overlap=self.training.sw_overlap,
                mode="gaussian",
            )
        return torch.as_tensor(logits)[0].float()

    def predict(self, image: np.ndarray | torch.Tensor, available: np.ndarray) -> np.ndarray:
        """Label map ``(X, Y, Z)`` uint8 for one preprocessed image ``(C, X, Y, Z)``."""
        labels = self.predict_logits(image, available).argmax(0).to(torch.uint8).cpu().numpy()
        if self.training.postprocess_lcc:
            labels = self.largest_components(labels)
        return labels

    def largest_components(self, labels: np.ndarray) -> np.ndarray:
        """Keep the largest connected component of each foreground class (MONAI)."""
        from monai.transforms import KeepLargestConnectedComponent

        keep = KeepLargestConnectedComponent(
            applied_labels=list(range(1, self.cfg.num_classes)), independent=True
        )
        out = torch.as_tensor(keep(torch.as_tensor(labels)[None]))[0]
        return out.to(torch.uint8).numpy()

    def evaluate(self, cases: list[PreprocessedCase], *, hd95: bool = True) -> EvalResult:
        """Whole-volume metrics over labelled ``cases`` (sliding window, argmax).

        Args:
            cases: labelled preprocessed cases.
            hd95: also compute HD95 (about a second per case on a CPU); per-round
                evaluations that only plot Dice skip it.

        Raises:
            TrainingError: no labelled cases.
        """
        labelled = [c for c in cases if c.label is not None]
        if not labelled:
            raise TrainingError("no labelled cases to evaluate")
        out = []
        for c in labelled:
            pred = self.predict(c.image, c.available)
            spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(c.affine)[:3, :3], axis=0))
            out.append(
                case_metrics(
                    pred,
                    np.asarray(c.label),
                    self.cfg.num_classes,
                    c.case_id,
                    spacing,  # type: ignore[arg-type]
                    hd95=hd95,
                )
            )
        return summarize(out, self.cfg.labels)

    # -- weights -----------------------------------------------------------------------------

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state dict."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load ``state`` into the model.

        Raises:
            TrainingError: names or shapes differ from the model's (with the first few named).
        """
        own = self.model.state_dict()
        if strict:
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            if missing or unexpected:
                raise TrainingError(
                    f"weights do not match the model: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}; was the checkpoint built with another config?"
                )
        for k, v in state.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise TrainingError(
                    f"weight {k!r} has shape {tuple(v.shape)}, the model expects "
                    f"{tuple(own[k].shape)}"
                )
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=strict)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )
