"""Personalisation at the site: Ditto's personal model and the final personalisation round.

A site gets a model of its own when the run plan asks for it
(``federation.personalization``):

- ``finetune``: after the last round the site fine-tunes the final global model for
  ``federation.personalization_epochs`` local epochs on its own training cases, with the
  same trainer, loss and schedule (the configured schedule, run afresh over those epochs).
- ``ditto`` (Li et al., "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021): in every round, besides the global update, the site trains
  its personal model ``v`` for the same local epochs on ``loss(v) + lambda/2 ||v - w||^2``,
  ``w`` the round's global weights (the trainer's FedProx term with ``mu =
  federation.ditto_lambda``). ``v`` starts as the first global model the site receives and
  is kept in the run's state folder (``<state-dir>/runs/<run>/ditto/``, one file per round,
  the last two kept), so it survives restarts; it never leaves the site.

The final round (:func:`final_round`) is a train request flagged ``final-round`` that
carries the final global weights. The site builds its personal model (fine-tunes, or takes
Ditto's), evaluates the global and the personal model on its own test cases (its fixed
split; refused ``too-few-cases-for-metric`` below the policy's k, before any image is read)
and returns, for each, the mean Dice and a bootstrap 95% interval over those cases, rounded
as the policy says. Per-case values and weights never leave. The personal model is saved
as ``<state-dir>/runs/<run>/personal-model.pt`` in ``model.pt`` format, which
``fedmed predict --model`` takes. The answer is kept (``final.json``): a repeated final
request with the same weights (a coordinator that resumed) gets it again without training
or spending privacy again.

Under DP the personal model is trained through the DP path as well and every step is
recorded in the ledger: the model stays at the site, but its metrics leave. The run's noise
plan covers those epochs too (:func:`fedmed.federation.site.dp_plan_epochs`), so with a
target ε the run, personalisation included, ends at that target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import FederationConfig
from fedmed.errors import RequestRefused
from fedmed.federation.site import (
    SiteSpec,
    build_trainer,
    check_privacy_budget,
    dp_plan_epochs,
    ledger_dir,
    load_cases,
    norm_keys_of,
    set_weights,
    site_seed,
    split_ids,
)
from fedmed.federation.site_state import (
    load_personal,
    read_json,
    run_state_dir,
    save_personal,
    weights_digest,
    write_json,
)
from fedmed.policy import ReasonCode, SitePolicy

log = logging.getLogger(__name__)

PERSONAL_MODEL_FILE = "personal-model.pt"
"""The site's personal model of a run, in ``model.pt`` format (``fedmed predict``)."""
FINAL_FILE = "final.json"
DITTO_OPTIMIZER_FILE = "ditto-optimizer.pt"
NO_PERSONAL_MODEL = "no-personal-model"
"""Why a Ditto site has no personal model: it trained in no round of the run."""
_PERSONAL_SEED = 7_919  # the personal model draws other patches than the global update


@dataclass(frozen=True)
class Scored:
    """Mean Dice over a site's test cases and its bootstrap 95% interval (rounded)."""

    dice: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class FinalResult:
    """What the final round reports (all of it may leave the site).

    Attributes:
        test_cases: the site's test cases behind every figure (at least the policy's k).
        global_model: the final global model (FedBN: with the site's own normalisation).
        personal: the personal model, or ``None`` (no personalisation, or skipped).
        personal_skipped: why there is no personal model although one was asked for
            (``epsilon-cap-reached``, ``no-personal-model``).
        epsilon: DP: the run's ε at the site after fine-tuning.
        delta: its δ.
    """

    test_cases: int
    global_model: Scored
    personal: Scored | None = None
    personal_skipped: str | None = None
    epsilon: float | None = None
    delta: float | None = None


def personal_model_path(state_dir: Path, run_name: str) -> Path:
    """``<state-dir>/runs/<run>/personal-model.pt``."""
    return run_state_dir(state_dir, run_name) / PERSONAL_MODEL_FILE


def _as_site_model(
    trainer: Any, weights: Mapping[str, np.ndarray], own_norm: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """The global weights as this site uses them (FedBN: its own normalisation tensors)."""
    out = {k: np.asarray(v) for k, v in weights.items()}
    if own_norm:
        keys = norm_keys_of(trainer)
        out.update({k: np.asarray(v) for k, v in own_norm.items() if k in keys})
    return out


def _numpy_weights(trainer: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in trainer.get_weights().items()}


def train_personal(
    cfg: FederationConfig,
    spec: SiteSpec,
    global_weights: Mapping[str, np.ndarray],
    *,
    server_round: int,
    total_rounds: int,
    local_epochs: int,
    run_name: str = "run",
    own_norm: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """Ditto: one round of the site's personal model, pulled towards the round's global one.

    The personal model of the latest earlier round is read from the run's state folder (a
    round re-run after a restart starts from the round before it, as FedBN's tensors do);
    in the first round the site takes part in, it starts as the global model. The same
    local epochs, schedule position and loss as the global update, plus
    ``ditto_lambda/2 ||v - w||^2``.

    Returns:
        The trainer's ``FitResult``; ``skipped`` (the DP budget forbids the fit) leaves the
        personal model as it was.

    Raises:
        FedMedError: the site's data cannot be loaded or training fails.
    """
    import torch

    from fedmed.training.trainer import seed_everything

    run_dir = run_state_dir(spec.state_dir, run_name)
    ledgers = ledger_dir(spec, split_ids(cfg, spec))
    cases = load_cases(cfg, spec, "train")
    seed = site_seed(cfg, spec.name, server_round) + _PERSONAL_SEED
    seed_everything(seed)
    trainer = build_trainer(cfg, spec, run_name, ledgers, optimizer_file=DITTO_OPTIMIZER_FILE)
    glob = _as_site_model(trainer, global_weights, own_norm)
    start = load_personal(run_dir, before_round=server_round)
    set_weights(trainer, glob if start is None else start)
    reference = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in glob.items()}
    fit = trainer.fit(
        cases, local_epochs, reference=reference, mu=cfg.federation.ditto_lambda,
        start_epoch=(server_round - 1) * local_epochs, total_epochs=total_rounds * local_epochs,
        plan_epochs=dp_plan_epochs(cfg, total_rounds, local_epochs), round_index=server_round,
        seed=seed,
    )
    if fit.skipped:
        log.warning("site %s: personal model unchanged in round %d: %s", spec.name,
                    server_round, fit.skipped)
    else:
        save_personal(run_dir, server_round, _numpy_weights(trainer))
    return fit


def _finetune(
    cfg: FederationConfig, spec: SiteSpec, glob: Mapping[str, np.ndarray], *,
    total_rounds: int, local_epochs: int, run_name: str, ledgers: Path, num_train: int,
) -> tuple[dict[str, np.ndarray] | None, Any]:
    """The final global model fine-tuned on the site's own training cases.

    Returns:
        ``(weights, fit)``; ``weights`` is ``None`` when the privacy budget forbids it.

    Raises:
        RequestRefused: a DP setting the policy forbids (other than the spent budget).
    """
    from fedmed.training.trainer import seed_everything

    epochs = cfg.federation.personalization_epochs
    try:
        check_privacy_budget(cfg, spec, num_cases=num_train, local_epochs=local_epochs,
                             total_rounds=total_rounds, ledgers=ledgers, run_name=run_name,
                             train_epochs=epochs)
    except RequestRefused as exc:
        if exc.code != ReasonCode.EPSILON_CAP_REACHED.value:
            raise
        log.warning("site %s: no fine-tuning: %s", spec.name, exc)
        return None, None
    cases = load_cases(cfg, spec, "train")
    seed = site_seed(cfg, spec.name, total_rounds + 1)
    seed_everything(seed)
    trainer = build_trainer(cfg, spec, run_name, ledgers, optimizer_file=None)
    set_weights(trainer, glob)
    # The configured schedule run afresh over the fine-tuning epochs; under DP the run's
    # noise plan (which counts these epochs) sets sigma.
    fit = trainer.fit(
        cases, epochs, start_epoch=0, total_epochs=epochs,
        plan_epochs=dp_plan_epochs(cfg, total_rounds, local_epochs),
        round_index=total_rounds + 1, seed=seed,
    )
    if fit.skipped:
        log.warning("site %s: no fine-tuning: %s", spec.name, fit.skipped)
        return None, fit
    return _numpy_weights(trainer), fit


def _score(trainer: Any, weights: Mapping[str, np.ndarray], cases: list[Any],
           policy: SitePolicy) -> Scored:
    """Mean Dice of ``weights`` over ``cases`` and its bootstrap interval, rounded."""
    from fedmed.training.metrics import bootstrap_ci, case_dice_means

    set_weights(trainer, weights)
    result = trainer.evaluate(cases, hd95=False)
    _, low, high = bootstrap_ci(case_dice_means(result))
    return Scored(policy.round_metric(result.dice_mean), policy.round_metric(low),
                  policy.round_metric(high))


def save_personal_model(
    cfg: FederationConfig, spec: SiteSpec, run_name: str, weights: Mapping[str, np.ndarray]
) -> Path:
    """The personal model as ``personal-model.pt`` (``model.pt`` format, atomic)."""
    import torch

    from fedmed.data.planning import plan_preprocessing
    from fedmed.training.checkpoint import save_model

    spacing = plan_preprocessing(cfg).target_spacing
    return save_model(
        personal_model_path(spec.state_dir, run_name),
        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}, cfg,
        (float(spacing[0]), float(spacing[1]), float(spacing[2])), mode="personalised",
        personalization=cfg.federation.personalization, site=spec.name, run=run_name,
    )


def _plan_of(cfg: FederationConfig) -> dict[str, Any]:
    fed = cfg.federation
    return {"personalization": fed.personalization, "epochs": fed.personalization_epochs,
            "lambda": fed.ditto_lambda}


def _kept(run_dir: Path, digest: str, cfg: FederationConfig) -> FinalResult | None:
    """The answer already given to this final round (same weights, same plan), if any."""
    saved = read_json(run_dir / FINAL_FILE)
    if not isinstance(saved, dict) or saved.get("sha256") != digest:
        return None
    if saved.get("plan") != _plan_of(cfg):
        return None
    try:
        r = dict(saved["result"])
        personal = r.pop("personal")
        return FinalResult(global_model=Scored(**r.pop("global_model")),
                           personal=None if personal is None else Scored(**personal), **r)
    except (KeyError, TypeError, ValueError):
        return None


def final_round(
    cfg: FederationConfig,
    spec: SiteSpec,
    global_weights: Mapping[str, np.ndarray],
    *,
    total_rounds: int,
    local_epochs: int,
    run_name: str = "run",
    own_norm: Mapping[str, np.ndarray] | None = None,
) -> FinalResult:
    """Personalise, then score the global and the personal model on the site's test cases.

    Args:
        cfg: the run plan, completed with the site's own settings.
        spec: the site.
        global_weights: the final global weights (the request's).
        total_rounds: the run's rounds (the final round is ``total_rounds + 1``).
        local_epochs: the rounds' local epochs (the DP noise plan).
        run_name: the run.
        own_norm: FedBN: the site's normalisation tensors after the last round.

    Raises:
        RequestRefused: ``too-few-cases-for-metric`` (fewer test cases than k, checked
            before any image is read), or a DP setting the policy forbids.
        FedMedError: the site's data cannot be loaded or training fails.
    """
    parts = split_ids(cfg, spec)
    policy = spec.policy
    policy.check_cases_for_metric(len(parts["test"]))
    run_dir = run_state_dir(spec.state_dir, run_name)
    digest = weights_digest(global_weights)
    kept = _kept(run_dir, digest, cfg)
    if kept is not None:
        log.info("site %s: final round of run %s already answered", spec.name, run_name)
        return kept
    ledgers = ledger_dir(spec, parts)
    test = load_cases(cfg, spec, "test")
    trainer = build_trainer(cfg, spec, run_name, ledgers, optimizer_file=None)
    glob = _as_site_model(trainer, global_weights, own_norm)
    personal: dict[str, np.ndarray] | None = None
    skipped: str | None = None
    fit: Any = None
    kind = cfg.federation.personalization
    if kind == "finetune":
        personal, fit = _finetune(cfg, spec, glob, total_rounds=total_rounds,
                                  local_epochs=local_epochs, run_name=run_name,
                                  ledgers=ledgers, num_train=len(parts["train"]))
        skipped = None if personal is not None else ReasonCode.EPSILON_CAP_REACHED.value
    elif kind == "ditto":
        personal = load_personal(run_dir, before_round=total_rounds + 1)
        skipped = None if personal is not None else NO_PERSONAL_MODEL
    result = FinalResult(
        test_cases=len(test), global_model=_score(trainer, glob, test, policy),
        personal=None if personal is None else _score(trainer, personal, test, policy),
        personal_skipped=skipped,
        epsilon=None if fit is None else fit.epsilon, delta=None if fit is None else fit.delta,
    )
    if personal is not None:
        save_personal_model(cfg, spec, run_name, personal)
    write_json(run_dir / FINAL_FILE, {"sha256": digest, "plan": _plan_of(cfg),
                                      "result": asdict(result)})
    return result


__all__ = [
    "FINAL_FILE",
    "NO_PERSONAL_MODEL",
    "PERSONAL_MODEL_FILE",
    "FinalResult",
    "Scored",
    "final_round",
    "personal_model_path",
    "save_personal_model",
    "train_personal",
]
