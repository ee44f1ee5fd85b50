"""Patient-level differential privacy: DP-SGD (Opacus) on top of :class:`LocalTrainer`.

The privacy unit is the patient (case). Every DP step:

1. draws a Poisson sample of patients (each independently with probability
   ``q = expected_batch_size / num_cases``, capped at 1) with Opacus'
   :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`;
2. takes exactly one patch per sampled patient (so a patient contributes at most one
   example to a step, whatever ``patches_per_case`` says for non-private training);
3. computes per-patient gradients (:class:`opacus.GradSampleModule`), clips each to
   ``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier * max_grad_norm``
   (:class:`opacus.optimizers.DPOptimizer`). Empty Poisson batches are real steps: they
   release pure noise and are counted by the accountant.

Accounting is ours, not the PrivacyEngine's: each site's composition is kept in the
:mod:`fedmed.training.ledger` on disk for the whole run (all rounds), so epsilon is the
run's, not one round's, and survives client restarts. A site whose next round would take
it past ``max_epsilon`` trains no further and says so in :attr:`FitResult.skipped`.

Randomness: the patient sampling and the noise are drawn from generators seeded from OS
entropy (or ``torchcsprng`` with ``privacy.secure_rng``), never from ``training.seed`` --
noise that can be regenerated from a config file protects nobody. DP runs are therefore not
bit-reproducible, on purpose.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmed.config import PrivacyConfig
from fedmed.errors import PrivacyError
from fedmed.training.ledger import PrivacyLedger

if TYPE_CHECKING:
    from fedmed.data.preprocess import PreprocessedCase
    from fedmed.training.trainer import FitResult, LocalTrainer

log = logging.getLogger(__name__)

StepCallback = Callable[[list[int]], None]
"""Called with the case indices of every DP step (tests and audits)."""


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


def poisson_batches(
    num_cases: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``steps`` Poisson samples of case indices (each case independently with prob. ``q``).

    A case appears at most once per batch; batches may be empty.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=num_cases, sample_rate=sample_rate, generator=generator, steps=steps
    )
    yield from sampler


def per_patient_loss(trainer: LocalTrainer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice + CE as the *mean of per-patient losses* (Dice per sample, ``batch=False``).

    The trainer's own loss pools Dice over the batch (``batch=True``), which makes one
    patient's gradient depend on the others' data and breaks the per-example sensitivity
    bound DP-SGD relies on; this one decomposes over the batch.
    """
    from monai.losses import DiceCELoss

    lc = trainer.cfg.training.loss
    weight = (
        torch.tensor(lc.class_weights, dtype=torch.float32, device=trainer.device)
        if lc.class_weights is not None
        else None
    )
    return DiceCELoss(
        to_onehot_y=True, softmax=True, lambda_dice=lc.dice_weight, lambda_ce=lc.ce_weight,
        weight=weight, batch=False,
    )


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


def open_ledger(trainer: LocalTrainer) -> PrivacyLedger:
    """The trainer's site ledger (``trainer.state_dir``, default ``./.fedmed-state``)."""
    privacy = trainer.privacy
    return PrivacyLedger.open(
        trainer.state_dir, trainer.run_id, trainer.site,
        accountant=privacy.accountant, delta=privacy.delta,
    )


def _collate(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(items)


def fit_private(
    trainer: LocalTrainer,
    cases: list[PreprocessedCase],
    epochs: int,
    *,
    start_epoch: int = 0,
    total_epochs: int | None = None,
    round_index: int | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    mu: float = 0.0,
    on_step: StepCallback | None = None,
) -> FitResult:
    """Train ``trainer.model`` on ``cases`` with patient-level DP-SGD for ``epochs`` epochs.

    Args:
        trainer: the local trainer (model, device, optimiser factory, config, privacy,
            site, state_dir, run_id).
        cases: the site's training cases, one per patient.
        epochs: local epochs; an epoch is ``ceil(1/q)`` Poisson steps.
        start_epoch: global index of the first epoch (learning-rate schedule).
        total_epochs: planned epochs of the whole run (federated: rounds * local epochs);
            sigma from ``target_epsilon`` is planned over this many epochs. Default
            ``start_epoch + epochs``.
        round_index: federated round, stored in the ledger and metric lines.
        reference: global weights of the FedProx proximal term.
        mu: proximal coefficient (0: off).
        on_step: called with the sampled case indices of every step (auditing, tests).

    Returns:
        :class:`FitResult` with the site's epsilon spent so far (after this fit) and its
        delta; ``skipped`` set (and no training done) when the next round would exceed the
        site's ``max_epsilon``.

    Raises:
        PrivacyError: the model is not DP-compatible, the target epsilon is unreachable,
            ``secure_rng`` without torchcsprng, or the ledger is unreadable/mismatched.
    """
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    from fedmed.training.trainer import FitResult, lr_factor

    started = time.perf_counter()
    privacy = trainer.privacy
    t = trainer.cfg.training
    n = len(cases)
    q = sample_rate_for(privacy, n)
    spe = steps_per_epoch(q)
    steps = epochs * spe
    planned_epochs = max(total_epochs or 0, start_epoch + epochs)
    ledger = open_ledger(trainer)
    sigma = noise_multiplier_for(privacy, q, planned_epochs * spe, ledger)

    # budget: refuse the whole round rather than stop half-way (a partial round would still
    # spend privacy and return a worse model)
    budget = max_epsilon_of(privacy)
    would = ledger.epsilon_if([(sigma, q, steps)])
    if budget is not None and would > budget * (1 + 1e-9):
        reason = (
            f"privacy budget exhausted: epsilon would reach {would:.3f} > max {budget:.3f} "
            f"(delta={privacy.delta}); the site has spent {ledger.epsilon():.3f}"
        )
        log.warning("site %s round %s: %s", trainer.site, round_index, reason)
        ledger.record_skip(round_index, reason)
        return FitResult(
            loss=math.nan, steps=0, num_cases=0, seconds=time.perf_counter() - started,
            epsilon=ledger.epsilon(), delta=privacy.delta, skipped=reason,
        )

    plain = trainer.model
    check_model(plain)
    generator = make_generator(privacy.secure_rng)  # patient sampling (CPU)
    noise_generator = (
        generator
        if privacy.secure_rng or trainer.device.type == "cpu"
        else make_generator(False, trainer.device)
    )
    loss_fn = per_patient_loss(trainer)
    ppc = trainer.cfg.preprocessing.patches_per_case
    # the trainer's dataset holds patches_per_case items per case, case i first at i * ppc;
    # we take exactly one of them per sampled patient
    dataset = trainer.patch_dataset(cases, seed=t.seed, train=True)
    ref = (
        {k: v.detach().to(trainer.device) for k, v in reference.items()}
        if reference is not None and mu > 0
        else None
    )
    ref_of = (
        {id(p): ref[name] for name, p in plain.named_parameters() if name in ref}
        if ref is not None
        else {}
    )

    gsm = GradSampleModule(plain, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(
        trainer.make_optimizer([p for p in plain.parameters() if p.requires_grad]),
        noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=q * n, loss_reduction="mean", generator=noise_generator,
        secure_mode=privacy.secure_rng,
    )
    # Opacus' own accountant counts the steps the optimiser actually noised; the ledger
    # records that count, so a step cannot go unaccounted
    counter = RDPAccountant()
    optimizer.attach_step_hook(counter.get_optimizer_hook_fn(sample_rate=q))

    total_steps = max(1, planned_epochs * spe)
    step = start_epoch * spe
    decay = privacy.weight_averaging
    averaged = (
        [p.detach().clone() for p in optimizer.params] if decay > 0 else None
    )
    epoch_loss = math.nan
    gsm.train()
    try:
        for e in range(epochs):
            epoch = start_epoch + e
            ep_started = time.perf_counter()
            losses: list[float] = []
            for idx in poisson_batches(n, q, spe, generator):
                optimizer.zero_grad(set_to_none=True)
                used: list[int] = []
                if idx:
                    # fresh patch draws per step: a patient sampled twice in an epoch gets
                    # two different patches
                    dataset.set_epoch(step)
                    batch = _collate([dataset[i * ppc] for i in idx])
                    used = [int(c) for c in batch["case_index"]]
                    x = batch["image"].to(trainer.device)
                    avail = batch["available"].to(trainer.device)
                    with warnings.catch_warnings():
                        # inputs never require grad; Opacus' full backward hooks say so
                        warnings.filterwarnings("ignore", message="Full backward hook")
                        logits = gsm(x, avail)
                        loss = loss_fn(logits.float(), batch["label"].to(trainer.device))
                        loss.backward()
                    losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(used)
                for p in optimizer.params:
                    # an empty Poisson batch (or a parameter unused by these patients) has
                    # zero per-sample gradients: the step still adds noise and is counted
                    if getattr(p, "grad_sample", None) is None:
                        p.grad_sample = torch.zeros(
                            (len(idx), *p.shape), device=p.device, dtype=p.dtype
                        )
                for g in optimizer.param_groups:
                    g["lr"] = t.learning_rate * lr_factor(t.schedule, step / total_steps)
                if optimizer.pre_step():  # clip, sum, noise, scale, account
                    for p in optimizer.params:
                        r = ref_of.get(id(p))
                        if r is not None and p.grad is not None:
                            # FedProx: the gradient of mu/2 ||w - w_ref||^2 depends only on
                            # released weights, not on any patient -> post-processing, no
                            # clipping/noise needed and no privacy cost
                            p.grad.add_(p.detach() - r, alpha=mu)
                    optimizer.original_optimizer.step()
                    if averaged is not None:
                        with torch.no_grad():
                            for a, p in zip(averaged, optimizer.params, strict=True):
                                a.lerp_(p.detach(), 1.0 - decay)
                step += 1
            epoch_loss = float(np.mean(losses)) if losses else math.nan
            trainer._log_epoch(
                epoch=epoch + 1, loss=epoch_loss, round_index=round_index,
                lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - ep_started,
                cases=n, dp_steps=spe, noise_multiplier=sigma, sample_rate=q,
            )
        if averaged is not None:
            with torch.no_grad():
                for a, p in zip(averaged, optimizer.params, strict=True):
                    p.copy_(a)
    finally:
        optimizer.zero_grad(set_to_none=True)
        trainer.model = gsm.to_standard_module()
        taken = sum(s for _, _, s in counter.history)
        if taken:
            # recorded even when training failed half-way: noisy steps were taken
            entry = ledger.record(
                round_index=round_index, steps=taken, sample_rate=q, noise_multiplier=sigma,
                epochs=epochs, num_cases=n, max_grad_norm=privacy.max_grad_norm,
            )
            log.info(
                "site %s round %s: DP fit %d steps q=%.4g sigma=%.4g -> epsilon %.3f (delta %g)",
                trainer.site, round_index, taken, q, sigma, entry.epsilon, privacy.delta,
            )
    return FitResult(
        loss=epoch_loss, steps=taken, num_cases=n, seconds=time.perf_counter() - started,
        epsilon=ledger.epsilon(), delta=privacy.delta,
    )
