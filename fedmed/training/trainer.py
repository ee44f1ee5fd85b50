"""The local trainer: one implementation for every mode (site, site alone, pooled data).

:class:`LocalTrainer` trains a network on preprocessed cases (patches, Dice + CE loss,
AdamW/SGD, cosine/poly schedule, AMP on CUDA, gradient accumulation, optional FedProx
proximal term), evaluates whole volumes with sliding-window inference, and predicts label
maps. Plain and DP training (``privacy.enabled``: patient-level DP-SGD, see
:mod:`fedmed.training.dp`) run the same :class:`~fedmed.training.loop.EpochLoop`. It knows
nothing of Flower.

Array contract: cases are :class:`~fedmed.data.preprocess.PreprocessedCase` (image
``(C, X, Y, Z)`` float32, label ``(1, X, Y, Z)``); batches add ``B``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmed.config import FederationConfig, PrivacyConfig
from fedmed.errors import TrainingError
from fedmed.training.dp import PrivatePlan
from fedmed.training.ledger import PrivacyLedger
from fedmed.training.loop import (
    EpochLogger,
    EpochLoop,
    FitResult,
    build_loss,
    build_scheduler,
    proximal_term,
)
from fedmed.training.metrics import EvalResult, case_metrics, summarize

if TYPE_CHECKING:
    from fedmed.data.preprocess import PreprocessedCase

__all__ = ["FitResult", "LocalTrainer", "seed_everything", "select_device"]

log = logging.getLogger(__name__)


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
        on_epoch: called with every epoch's metrics line (run tracking), or ``None``.
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
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
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
        self.on_epoch = on_epoch

    # -- building blocks --------------------------------------------------------------------

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
        plan_epochs: int | None = None,
    ) -> FitResult:
        """Train on ``cases`` for ``epochs`` passes.

        Args:
            cases: training cases (preprocessed, labelled).
            epochs: passes over the cases (each visits every case ``patches_per_case`` times).
            reference: weights of the FedProx proximal term (the round's global weights).
            mu: proximal coefficient; 0 disables the term.
            start_epoch: global epoch index of the first epoch (for the LR schedule across
                federated rounds, and for reproducible sampling).
            total_epochs: planned epochs of the whole run (schedule length, and the DP noise
                plan); at least ``start_epoch + epochs``, which is the default.
            round_index: federated round, written into metric lines (and the DP ledger).
            seed: seed of the patch draws (and of the shuffling of plain training); default
                ``training.seed``. DP's patient sampling and noise never use it.
            plan_epochs: DP: the epochs the noise plan covers (sigma computed from
                ``target_epsilon``) when a site trains more in a run than the schedule's
                epochs (a personal model besides the global one); at least the schedule's
                length, which is the default.

        Returns:
            :class:`FitResult` with ``num_cases = len(cases)``; under DP also epsilon and
            delta, or ``skipped`` (and no training) when the budget forbids the fit.

        Raises:
            TrainingError: no cases, or a case without a label.
            PrivacyError: (DP) the model is not DP-compatible, the target epsilon is
                unreachable, ``secure_rng`` without torchcsprng, or an unreadable ledger.
        """
        if not cases:
            raise TrainingError(f"site {self.site or '(pooled)'}: no training cases to fit on")
        missing = [c.case_id for c in cases if c.label is None]
        if missing:
            raise TrainingError(f"cases without a label cannot be trained on: {missing[:5]}")
        started = time.perf_counter()
        # the schedule (and a DP noise plan) never ends before this fit does
        total = max(total_epochs or 0, start_epoch + epochs)
        seed = self.training.seed if seed is None else seed
        patches = self.patch_dataset(cases, seed=seed, train=True)
        if self.privacy.enabled:
            result = self._fit_private(
                patches, epochs, start_epoch, total, round_index, reference=reference, mu=mu,
                plan_epochs=max(plan_epochs or 0, total),
            )
        else:
            result = self._fit_plain(
                patches, epochs, start_epoch, total, round_index, reference=reference, mu=mu,
                seed=seed,
            )
        return replace(result, seconds=time.perf_counter() - started)

    def _fit_plain(
        self,
        patches: Any,
        epochs: int,
        start_epoch: int,
        total_epochs: int,
        round_index: int | None,
        *,
        reference: Mapping[str, torch.Tensor] | None,
        mu: float,
        seed: int,
    ) -> FitResult:
        """Shuffled patches, the configured optimiser (kept across rounds on request)."""
        t = self.training
        penalty: Callable[[], torch.Tensor] | None = None
        if reference is not None and mu > 0:
            ref = {k: v.detach().to(self.device) for k, v in reference.items()}

            def penalty() -> torch.Tensor:
                return 0.5 * mu * proximal_term(self.model, ref)

        loader = torch.utils.data.DataLoader(
            patches,
            batch_size=t.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed + 7919 * start_epoch),
            num_workers=t.num_workers,
            drop_last=len(patches) >= t.batch_size,
            persistent_workers=False,
        )
        optimizer = self.make_optimizer(self.model.parameters())
        self._restore_optimizer(optimizer, round_index)
        scheduler = build_scheduler(
            optimizer, t, steps_per_epoch=max(1, len(loader) // t.accumulate),
            start_epoch=start_epoch, total_epochs=total_epochs,
        )
        scaled = self.device.type == "cuda" and t.amp and not torch.cuda.is_bf16_supported()
        loop = self._loop(
            self.model, build_loss(t.loss, self.device), optimizer, scheduler, loader,
            patches.set_epoch, round_index, len(patches.cases),
            scaler=torch.amp.GradScaler("cuda", enabled=scaled), autocast=self.autocast,
            accumulate=t.accumulate, penalty=penalty,
        )
        loss = loop.run(epochs, start_epoch)
        self._keep_optimizer(optimizer, round_index)
        return FitResult(loss=loss, steps=loop.steps_taken, num_cases=len(patches.cases),
                         seconds=0.0)

    def _fit_private(
        self,
        patches: Any,
        epochs: int,
        start_epoch: int,
        total_epochs: int,
        round_index: int | None,
        *,
        reference: Mapping[str, torch.Tensor] | None,
        mu: float,
        plan_epochs: int,
    ) -> FitResult:
        """Patient-level DP-SGD: Poisson patient loader, DP optimiser, ledger.

        Without AMP (per-patient gradients in the parameters' precision) and without
        gradient accumulation (a Poisson batch is one step of the accountant).
        """
        t = self.training
        privacy = self.privacy
        ledger = PrivacyLedger.open(
            self.state_dir, self.run_id, self.site,
            accountant=privacy.accountant, delta=privacy.delta,
        )
        plan = PrivatePlan.make(
            privacy, ledger, num_cases=len(patches.cases), epochs=epochs,
            total_epochs=plan_epochs, round_index=round_index,
        )
        refusal = plan.refusal()
        if refusal is not None:
            return FitResult(loss=math.nan, steps=0, num_cases=0, seconds=0.0,
                             epsilon=ledger.epsilon(), delta=privacy.delta, skipped=refusal)
        base = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        # attach wraps self.model in place and unwraps it on exit
        with plan.attach(self.model, base, self.device, reference, mu) as dp:
            loader = plan.loader(patches, t.num_workers)
            scheduler = build_scheduler(
                dp.optimizer, t, steps_per_epoch=plan.steps_per_epoch,
                start_epoch=start_epoch, total_epochs=total_epochs,
            )
            loop = self._loop(
                dp.module, build_loss(t.loss, self.device, per_sample=True), dp.optimizer,
                scheduler, loader, loader.set_epoch, round_index, plan.num_cases,
                scaler=torch.amp.GradScaler("cuda", enabled=False),
                before_step=dp.before_step, after_step=dp.after_step,
                log_fields=plan.log_fields,
            )
            loss = loop.run(epochs, start_epoch)
        return FitResult(loss=loss, steps=plan.steps_taken, num_cases=plan.num_cases,
                         seconds=0.0, epsilon=ledger.epsilon(), delta=privacy.delta)

    def _loop(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: Any,
        set_epoch: Callable[[int], None],
        round_index: int | None,
        num_cases: int,
        **parts: Any,
    ) -> EpochLoop:
        """The shared epoch loop with this trainer's device, log and progress settings."""
        who = self.site or "pooled"
        return EpochLoop(
            model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
            loader=loader, set_epoch=set_epoch,
            logger=EpochLogger(self.metrics_path, self.site, self.on_epoch),
            device=self.device, label=who if round_index is None else f"{who} round {round_index}",
            progress=self.training.progress, round_index=round_index, num_cases=num_cases,
            **parts,
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

