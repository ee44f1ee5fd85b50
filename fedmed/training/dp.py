"""Patient-level differential privacy: what DP-SGD (Opacus) changes in the shared loop.

The privacy unit is the patient (case). A DP fit runs the same
:class:`~fedmed.training.loop.EpochLoop` as plain training, with the same loss builder
(per-patient form), schedule and epoch log; this module supplies only what differs:

1. the data loader (:mod:`fedmed.training.dp_loader`): every step draws a Poisson sample
   of patients (each independently with probability ``q = expected_batch_size /
   num_cases``, capped at 1) with Opacus' ``UniformWithReplacementSampler`` and takes
   exactly one patch per sampled patient (so a patient contributes at most one example to
   a step, whatever ``patches_per_case`` says for non-private training);
2. the optimiser (:meth:`PrivatePlan.attach`): per-patient gradients
   (``opacus.GradSampleModule``), clipped to ``max_grad_norm`` with Gaussian noise of std
   ``noise_multiplier * max_grad_norm`` added (``opacus.optimizers.DPOptimizer`` around the
   configured optimiser). Empty Poisson batches are real steps: they release pure noise and
   are counted by the accountant;
3. the accounting (:class:`PrivatePlan`): each site's composition is kept in the
   :mod:`fedmed.training.ledger` on disk for the whole run (all rounds), so epsilon is the
   run's, not one round's, and survives client restarts. A site whose next round would take
   it past ``max_epsilon`` trains no further and says so in ``FitResult.skipped``.

Randomness: the patient sampling and the noise are drawn from generators seeded from OS
entropy (or ``torchcsprng`` with ``privacy.secure_rng``), never from ``training.seed`` --
noise that can be regenerated from a config file protects nobody. DP runs are therefore not
bit-reproducible, on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmed.config import PrivacyConfig
from fedmed.errors import PrivacyError
from fedmed.training.dp_loader import PatientLoader, patient_loader
from fedmed.training.ledger import PrivacyLedger

log = logging.getLogger(__name__)


def sample_rate_for(privacy: PrivacyConfig, num_cases: int) -> float:
    """Poisson sampling rate of patients: ``expected_batch_size / num_cases``, at most 1.

    Raises:
        PrivacyError: no cases.
    """
    if num_cases <= 0:
        raise PrivacyError("DP training needs at least one case (patient); got none")
    return min(1.0, privacy.expected_batch_size / num_cases)


def steps_per_epoch(sample_rate: float) -> int:
    """DP steps in one epoch: ``ceil(1 / q)`` (one pass over the patients in expectation)."""
    return max(1, math.ceil(1.0 / sample_rate - 1e-12))


def max_epsilon_of(privacy: PrivacyConfig) -> float | None:
    """The site's budget: ``max_epsilon``, else ``target_epsilon``, else none."""
    return privacy.max_epsilon if privacy.max_epsilon is not None else privacy.target_epsilon


def noise_multiplier_for(
    privacy: PrivacyConfig, sample_rate: float, planned_steps: int, ledger: PrivacyLedger | None
) -> float:
    """Sigma: ``privacy.noise_multiplier``, else computed from ``target_epsilon``.

    The computed sigma reaches ``target_epsilon`` at ``delta`` after ``planned_steps`` steps
    at ``sample_rate`` (Opacus' ``get_noise_multiplier`` with the configured accountant).

    The computed sigma is stored in the ledger's ``plan`` so later rounds of the run reuse it
    (and need not search again) as long as the plan is unchanged.

    Raises:
        PrivacyError: the target cannot be reached by any sigma Opacus will consider.
    """
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    if privacy.target_epsilon is None:
        # a per-site override can enable DP without either (model_copy skips validation)
        raise PrivacyError(
            "privacy is enabled but neither privacy.noise_multiplier nor "
            "privacy.target_epsilon is set; set one of them"
        )
    plan = {
        "target_epsilon": float(privacy.target_epsilon),
        "delta": float(privacy.delta),
        "sample_rate": float(sample_rate),
        "planned_steps": int(planned_steps),
        "accountant": privacy.accountant,
    }
    if ledger is not None and ledger.plan is not None:
        known = {k: ledger.plan.get(k) for k in plan}
        if known == plan and "noise_multiplier" in ledger.plan:
            return float(ledger.plan["noise_multiplier"])
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = float(get_noise_multiplier(
            target_epsilon=privacy.target_epsilon, target_delta=privacy.delta,
            sample_rate=sample_rate, steps=planned_steps, accountant=privacy.accountant,
        ))
    except ValueError as exc:
        raise PrivacyError(
            f"privacy.target_epsilon={privacy.target_epsilon} at delta={privacy.delta} cannot be "
            f"reached over {planned_steps} steps at sampling rate {sample_rate:.4g} ({exc}); "
            "raise target_epsilon, train fewer rounds/epochs, or lower expected_batch_size"
        ) from None
    if ledger is not None:
        ledger.plan = {**plan, "noise_multiplier": sigma}
    return sigma


def make_generator(secure: bool, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for patient sampling or noise, unpredictable from the config.

    Args:
        secure: use a cryptographically secure generator (``torchcsprng``, what Opacus 1.6
            requires for ``secure_mode``).
        device: where the generator draws (the noise is drawn on the model's device).

    Raises:
        PrivacyError: ``secure`` but ``torchcsprng`` is not installed.
    """
    if secure:
        try:
            import torchcsprng as csprng  # type: ignore[import-not-found]
        except ImportError:
            raise PrivacyError(
                "privacy.secure_rng is true, which needs the torchcsprng package (Opacus' "
                "secure generator); install a build matching your torch, see "
                "https://github.com/pytorch/csprng#installation, or set "
                "privacy.secure_rng: false (sampling and noise then use torch's generator "
                "seeded from OS entropy, fine for research but not hardened against "
                "attacks on the PRNG)"
            ) from None
        return csprng.create_random_device_generator("/dev/urandom")
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def check_model(model: nn.Module) -> None:
    """Raise if Opacus cannot compute exact per-sample gradients for ``model``.

    Raises:
        PrivacyError: the validator's findings (e.g. BatchNorm), with the fix.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(
            "the network is not compatible with DP-SGD (per-sample gradients): "
            + "; ".join(str(e) for e in errors[:5])
            + " -- use model.norm: instance or group (fedmed.models builds DP-ready networks)"
        )


@dataclass
class PrivateSteps:
    """What the shared epoch loop needs to run DP-SGD steps (see :meth:`PrivatePlan.attach`).

    Attributes:
        module: Opacus' ``GradSampleModule`` around the model (per-patient gradients).
        optimizer: Opacus' ``DPOptimizer`` around the configured optimiser: clip, noise,
            account (and FedProx's pull) in its step.
        averaged: the moving average of the iterates (``privacy.weight_averaging``), or
            ``None``.
        decay: the average's decay.
    """

    module: nn.Module
    optimizer: Any
    averaged: list[torch.Tensor] | None
    decay: float

    def before_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Give every parameter a per-patient gradient, zero where the batch gave none.

        An empty Poisson batch (or a parameter unused by these patients) has zero
        per-sample gradients: the step still adds noise and is counted.
        """
        rows = len(batch["case_index"])
        for p in self.optimizer.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((rows, *p.shape), device=p.device, dtype=p.dtype)

    def after_step(self) -> None:
        """Move the average towards the new iterate (post-processing: no privacy cost)."""
        if self.averaged is None:
            return
        with torch.no_grad():
            for a, p in zip(self.averaged, self.optimizer.params, strict=True):
                a.lerp_(p.detach(), 1.0 - self.decay)

    def keep_average(self) -> None:
        """Load the average into the model: what the site keeps and sends."""
        if self.averaged is None:
            return
        with torch.no_grad():
            for a, p in zip(self.averaged, self.optimizer.params, strict=True):
                p.copy_(a)


@dataclass
class PrivatePlan:
    """The privacy side of one DP fit: sampling rate, steps, noise, budget and ledger.

    Build it with :meth:`make`; :meth:`refusal` says whether the budget allows the fit,
    :meth:`loader` gives the Poisson patient loader and :meth:`attach` the DP optimiser
    (recording the steps it noised in the ledger when it ends).

    Attributes:
        privacy: the site's DP settings.
        ledger: the site's privacy ledger.
        num_cases: patients (the privacy unit).
        sample_rate: Poisson sampling rate ``q``.
        steps_per_epoch: DP steps per epoch, ``ceil(1 / q)``.
        noise_multiplier: sigma.
        epochs: local epochs of this fit.
        round_index: federated round (``None`` outside a federation).
        steps_taken: noised steps recorded by :meth:`attach`.
        generator: draws the patient sampling (and, on CPU, the noise); made on first use.
    """

    privacy: PrivacyConfig
    ledger: PrivacyLedger
    num_cases: int
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    epochs: int
    round_index: int | None
    steps_taken: int = 0
    generator: torch.Generator | None = None

    @classmethod
    def make(
        cls,
        privacy: PrivacyConfig,
        ledger: PrivacyLedger,
        *,
        num_cases: int,
        epochs: int,
        total_epochs: int,
        round_index: int | None,
    ) -> PrivatePlan:
        """Plan a fit of ``epochs`` epochs; sigma from a target is planned over ``total_epochs``.

        Raises:
            PrivacyError: no cases, or the target epsilon is unreachable.
        """
        q = sample_rate_for(privacy, num_cases)
        spe = steps_per_epoch(q)
        sigma = noise_multiplier_for(privacy, q, total_epochs * spe, ledger)
        return cls(privacy, ledger, num_cases, q, spe, sigma, epochs, round_index)

    @property
    def log_fields(self) -> dict[str, Any]:
        """Extra fields of the epoch log lines."""
        return {
            "dp_steps": self.steps_per_epoch,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def refusal(self) -> str | None:
        """Why the fit must not run (it would exceed the budget), recorded; else ``None``.

        The whole round is refused rather than stopped half-way: a partial round would
        still spend privacy and return a worse model.
        """
        budget = max_epsilon_of(self.privacy)
        steps = self.epochs * self.steps_per_epoch
        would = self.ledger.epsilon_if([(self.noise_multiplier, self.sample_rate, steps)])
        if budget is None or would <= budget * (1 + 1e-9):
            return None
        reason = (
            f"privacy budget exhausted: epsilon would reach {would:.3f} > max {budget:.3f} "
            f"(delta={self.privacy.delta}); the site has spent {self.ledger.epsilon():.3f}"
        )
        log.warning("site %s round %s: %s", self.ledger.site, self.round_index, reason)
        self.ledger.record_skip(self.round_index, reason)
        return reason

    def sampling_generator(self) -> torch.Generator:
        """The generator of the patient sampling: OS entropy, or ``torchcsprng``.

        Raises:
            PrivacyError: ``secure_rng`` without torchcsprng.
        """
        if self.generator is None:
            self.generator = make_generator(self.privacy.secure_rng)
        return self.generator

    def loader(self, patches: Any, num_workers: int = 0) -> PatientLoader:
        """The Poisson patient loader over ``patches`` (see :mod:`fedmed.training.dp_loader`)."""
        return patient_loader(
            patches, self.sample_rate, self.steps_per_epoch, self.sampling_generator(),
            num_workers,
        )

    @contextlib.contextmanager
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        reference: Mapping[str, torch.Tensor] | None = None,
        mu: float = 0.0,
    ) -> Iterator[PrivateSteps]:
        """Wrap ``model`` and ``optimizer`` for DP-SGD for the duration of the ``with`` block.

        The optimiser must be over the model's trainable parameters. On exit the model is
        unwrapped (it keeps its own parameter names), the average of the iterates is loaded
        (``privacy.weight_averaging``, after a successful block) and the steps actually
        noised are recorded in the ledger, even when training failed half-way.

        Raises:
            PrivacyError: the model is not DP-compatible, or ``secure_rng`` without
                torchcsprng.
        """
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        check_model(model)
        noise = (
            self.sampling_generator()
            if self.privacy.secure_rng or device.type == "cpu"
            else make_generator(False, device)
        )
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        dp_optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm,
            expected_batch_size=self.sample_rate * self.num_cases, loss_reduction="mean",
            generator=noise, secure_mode=self.privacy.secure_rng,
        )
        # Opacus' own accountant counts the steps the optimiser actually noised; the ledger
        # records that count, so a step cannot go unaccounted
        counter = RDPAccountant()
        dp_optimizer.attach_step_hook(
            _step_hook(counter.get_optimizer_hook_fn(sample_rate=self.sample_rate),
                       _proximal_pull(model, reference, mu))
        )
        decay = self.privacy.weight_averaging
        averaged = [p.detach().clone() for p in dp_optimizer.params] if decay > 0 else None
        steps = PrivateSteps(module, dp_optimizer, averaged, decay)
        try:
            with warnings.catch_warnings():
                # inputs never require grad; Opacus' full backward hooks say so
                warnings.filterwarnings("ignore", message="Full backward hook")
                yield steps
            steps.keep_average()
        finally:
            dp_optimizer.zero_grad(set_to_none=True)
            module.to_standard_module()
            self._record(sum(s for _, _, s in counter.history))

    def _record(self, taken: int) -> None:
        self.steps_taken = taken
        if not taken:
            return
        # recorded even when training failed half-way: noisy steps were taken
        entry = self.ledger.record(
            round_index=self.round_index, steps=taken, sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier, epochs=self.epochs,
            num_cases=self.num_cases, max_grad_norm=self.privacy.max_grad_norm,
        )
        log.info(
            "site %s round %s: DP fit %d steps q=%.4g sigma=%.4g -> epsilon %.3f (delta %g)",
            self.ledger.site, self.round_index, taken, self.sample_rate,
            self.noise_multiplier, entry.epsilon, self.privacy.delta,
        )


def _proximal_pull(
    model: nn.Module, reference: Mapping[str, torch.Tensor] | None, mu: float
) -> Callable[[Any], None] | None:
    """FedProx for DP-SGD: add ``mu (w - w_ref)`` to the noised gradients.

    The gradient of ``mu/2 ||w - w_ref||^2`` depends only on released weights, not on any
    patient: post-processing, no clipping or noise needed and no privacy cost. (Plain
    training adds the term to the loss instead; here it would be clipped per patient.)
    """
    if reference is None or mu <= 0:
        return None
    ref_of = {
        id(p): reference[name].detach().to(p.device)
        for name, p in model.named_parameters()
        if name in reference
    }

    def pull(optimizer: Any) -> None:
        for p in optimizer.params:
            r = ref_of.get(id(p))
            if r is not None and p.grad is not None:
                p.grad.add_(p.detach() - r, alpha=mu)

    return pull


def _step_hook(*hooks: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """One DPOptimizer step hook (it takes one) that runs ``hooks`` in order."""

    def hook(optimizer: Any) -> None:
        for h in hooks:
            if h is not None:
                h(optimizer)

    return hook
