"""The site's work, without Flower types: train or evaluate the global model on its data.

:func:`train_site` and :func:`evaluate_site` are plain functions (config, site, NumPy
weights in; NumPy weights and numbers out) so they can be tested and reused without
Flower; :mod:`fedmed.federation.client_app` translates Flower messages to and from them
(through :mod:`fedmed.federation.protocol`).

Where a site's folders and policy come from -- never from the coordinator's messages:

- Deployment: the SuperNode's node config, ``flower-supernode --node-config
  "data-dir='/srv/imaging/fedmed' cache-dir='/var/cache/fedmed' state-dir='/var/lib/fedmed'
  policy='/etc/fedmed/site-policy.yaml' site-name='hospital-a' device='cuda'"``
  (:func:`site_from_node_config`; ``data-dir``, ``cache-dir``, ``state-dir`` and
  ``policy`` are required).
- Simulation: the researcher's federation config, one :class:`SiteSpec` per site
  (:func:`simulated_sites`), picked by Flower's ``partition-id``.

State that outlives a round or a run lives in the site's state folder
(:mod:`fedmed.federation.site_state`): its fixed data split, the privacy ledger of its
dataset, the last global weights it received, FedBN's normalisation tensors, Ditto's
personal model. Personalisation (Ditto, fine-tuning, the final round) is
:mod:`fedmed.federation.personal`, built from the pieces here (:func:`build_trainer`,
:func:`load_cases`, :func:`set_weights`, :func:`site_seed`, :func:`dp_plan_epochs`).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmed.config import FederationConfig
from fedmed.errors import FederationError, PolicyError
from fedmed.federation.site_state import run_state_dir, split_norm
from fedmed.policy import ReasonCode, SitePolicy, load_policy, refuse, site_policy_for

log = logging.getLogger(__name__)

NODE_CONFIG_KEYS = ("data-dir", "cache-dir", "state-dir", "policy", "site-name", "device")
"""What a SuperNode's node config may name for fedmed."""


@dataclass(frozen=True)
class SiteSpec:
    """One site as it knows itself: its folders, its device and its policy.

    Attributes:
        name: the site's name (metrics, logs).
        data_dir: its data folder.
        cache_dir: its preprocessed-case cache; ``None``: ``<data_dir>/.fedmed-cache``.
        state_dir: what must survive restarts and runs (split, ledger, FedBN norms).
        policy: the site policy it enforces.
        device: ``cpu`` / ``cuda`` / ``None`` (the config's ``training.device``).
    """

    name: str
    data_dir: Path
    cache_dir: Path | None
    state_dir: Path
    policy: SitePolicy
    device: str | None = None


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser()


def site_from_node_config(node_config: Mapping[str, Any]) -> SiteSpec:
    """The site a deployed SuperNode stands for, from its node config alone.

    Raises:
        RequestRefused: ``site-not-configured`` (a folder is not named) or ``no-policy``
            (no policy named, or it cannot be read); the detail, for the site's log, says
            how to fix it.
    """
    missing = [k for k in ("data-dir", "cache-dir", "state-dir") if not node_config.get(k)]
    if missing:
        refuse(ReasonCode.SITE_NOT_CONFIGURED,
               f"the SuperNode's node config lacks {missing}; start it with --node-config "
               "\"data-dir='/srv/imaging/fedmed' cache-dir='/var/cache/fedmed' "
               "state-dir='/var/lib/fedmed' policy='/etc/fedmed/site-policy.yaml'\"")
    if not node_config.get("policy"):
        refuse(ReasonCode.NO_POLICY,
               "this SuperNode has no site policy, so it takes part in nothing; create one "
               "with `fedmed site policy init --out /etc/fedmed/site-policy.yaml`, review it, "
               "and name it in the node config: policy='/etc/fedmed/site-policy.yaml'")
    try:
        policy = load_policy(_path(node_config["policy"]))
    except PolicyError as exc:
        refuse(ReasonCode.NO_POLICY, str(exc))
        raise  # unreachable: refuse raises
    data_dir = _path(node_config["data-dir"])
    device = node_config.get("device") or None
    return SiteSpec(
        name=str(node_config.get("site-name") or policy.site or data_dir.name),
        data_dir=data_dir, cache_dir=_path(node_config["cache-dir"]),
        state_dir=_path(node_config["state-dir"]), policy=policy,
        device=None if device is None else str(device),
    )


def simulated_sites(cfg: FederationConfig) -> list[SiteSpec]:
    """Every site of a simulation, as the researcher's config places them on this machine.

    Raises:
        PolicyError: a policy file that a site's entry names is missing or invalid.
    """
    cache = cfg.preprocessing.cache_dir
    return [
        SiteSpec(
            name=s.name, data_dir=cfg.site_dir(s.name),
            cache_dir=cfg.resolve(cache) if cache is not None else None,
            state_dir=cfg.site_state_dir(s.name), policy=site_policy_for(cfg, s.name),
        )
        for s in cfg.sites
    ]


def site_for_node(node_config: Mapping[str, Any], sites: Sequence[SiteSpec] | None) -> SiteSpec:
    """The site a node stands for: ``sites[partition-id]`` in simulation, else its node config.

    Raises:
        FederationError: a partition id with no site.
        RequestRefused: see :func:`site_from_node_config`.
    """
    if sites is None:
        return site_from_node_config(node_config)
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < len(sites):
        raise FederationError(
            f"simulation partition-id {pid} has no site: the federation config names "
            f"{len(sites)} sites; run the simulation with num-supernodes = {len(sites)}"
        )
    return sites[pid]


@dataclass(frozen=True)
class SiteTrainResult:
    """What :func:`train_site` produced.

    Attributes:
        weights: the weights to send (FedBN: without the normalisation tensors), float32.
        num_cases: training cases (patients): the aggregation weight.
        loss: mean training loss of the last local epoch.
        seconds: wall time of the local training.
        epsilon: DP epsilon spent so far (DP runs).
        delta: its delta.
        skipped: why the site made no update (e.g. privacy budget exhausted).
    """

    weights: dict[str, np.ndarray]
    num_cases: int
    loss: float
    seconds: float
    epsilon: float | None = None
    delta: float | None = None
    skipped: str | None = None


def site_seed(cfg: FederationConfig, site: str, server_round: int) -> int:
    """The seed of a site's patch draws in a round."""
    # Stable across processes (unlike hash()): sites draw different patches, reproducibly.
    return cfg.training.seed + (zlib.crc32(site.encode()) % 100_003) + 1_000_003 * server_round


def split_ids(cfg: FederationConfig, spec: SiteSpec) -> dict[str, list[str]]:
    """The site's fixed train / val / test case ids (from its manifest; no voxel is read)."""
    from fedmed.data.dataset import SiteSplit, site_split_ids

    return site_split_ids(cfg, spec.name, data_dir=spec.data_dir,
                          fixed=SiteSplit(spec.state_dir, spec.policy.data))


def dataset_id(spec: SiteSpec, case_ids: Sequence[str]) -> str:
    """The site's dataset in the lifetime ledger.

    The policy's ``dataset_id``, else a hash of the sorted case ids (adding or removing
    cases makes another dataset).
    """
    given = spec.policy.privacy.dataset_id
    if given:
        return given
    digest = hashlib.sha256("\n".join(sorted(case_ids)).encode()).hexdigest()
    return f"cases-{digest[:16]}"


def ledger_dir(spec: SiteSpec, parts: Mapping[str, Sequence[str]]) -> Path:
    """Where this dataset's privacy ledgers are: ``<state-dir>/privacy/<dataset>``."""
    from fedmed.training.ledger import dataset_ledger_dir

    return dataset_ledger_dir(spec.state_dir, dataset_id(spec, [c for p in parts.values()
                                                                for c in p]))


def dp_plan_epochs(cfg: FederationConfig, total_rounds: int, local_epochs: int) -> int:
    """The local epochs of DP training a site plans for a whole run: the noise plan's length.

    The rounds' epochs, plus the personal model's: Ditto trains as many again, fine-tuning
    ``personalization_epochs``. With ``target_epsilon``, sigma is planned so that all of
    them together reach it (without personalisation: the rounds' epochs, as before).
    """
    fed = cfg.federation
    rounds = total_rounds * local_epochs
    if fed.personalization == "ditto":
        return 2 * rounds
    if fed.personalization == "finetune":
        return rounds + fed.personalization_epochs
    return rounds


def check_privacy_budget(
    cfg: FederationConfig, spec: SiteSpec, *, num_cases: int, local_epochs: int,
    total_rounds: int, ledgers: Path, run_name: str, train_epochs: int | None = None,
) -> None:
    """The DP checks that need the case count: sigma's floor and the lifetime cap.

    Made from the number of training cases alone, before any image is read; nothing is
    written (a refused request leaves the ledger as it was). ``train_epochs`` are the
    epochs this request trains (default: a round's, twice under Ditto, whose personal model
    trains as long as the global update).

    Raises:
        RequestRefused: ``noise-below-floor`` or ``epsilon-cap-reached``.
        PrivacyError: the target epsilon is unreachable, or a ledger is unreadable.
    """
    privacy = cfg.privacy_for(spec.name)
    if not privacy.enabled:
        return
    from fedmed.training.dp import noise_multiplier_for, sample_rate_for, steps_per_epoch
    from fedmed.training.ledger import PrivacyLedger, lifetime_epsilon

    if train_epochs is None:
        ditto = cfg.federation.personalization == "ditto"
        train_epochs = local_epochs * (2 if ditto else 1)
    q = sample_rate_for(privacy, num_cases)
    spe = steps_per_epoch(q)
    ledger = PrivacyLedger.open(ledgers, run_name, spec.name, accountant=privacy.accountant,
                                delta=privacy.delta)
    plan = dp_plan_epochs(cfg, total_rounds, local_epochs)
    sigma = noise_multiplier_for(privacy, q, plan * spe, ledger)
    spec.policy.check_noise(sigma)
    spent = lifetime_epsilon(ledgers, privacy.delta, [(sigma, q, train_epochs * spe)])
    spec.policy.check_lifetime_epsilon(spent)


def build_trainer(
    cfg: FederationConfig, spec: SiteSpec, run_name: str, ledgers: Path, *,
    optimizer_file: str | None = "optimizer.pt",
) -> Any:
    """The site's ``LocalTrainer`` for a run (its ledgers; its device).

    ``optimizer_file``: where, in the run's state folder, the optimiser's moments are kept
    across rounds when ``federation.keep_optimizer_state`` (``None``: never kept).
    """
    from fedmed.models import build_model
    from fedmed.training.trainer import LocalTrainer

    model = build_model(cfg.model, cfg.modalities, cfg.num_classes)
    optimizer_state = None
    if cfg.federation.keep_optimizer_state and optimizer_file is not None:
        optimizer_state = run_state_dir(spec.state_dir, run_name) / optimizer_file
    return LocalTrainer(
        cfg, model, device=spec.device, site=spec.name, state_dir=ledgers,
        run_id=run_name, optimizer_state=optimizer_state,
    )


def load_cases(
    cfg: FederationConfig, spec: SiteSpec, split: Literal["train", "val", "test"]
) -> list[Any]:
    """The site's preprocessed cases of one part of its fixed split (through its cache)."""
    from fedmed.data.dataset import SiteSplit, load_site_cases

    return load_site_cases(cfg, spec.name, split, cache_dir=spec.cache_dir,
                           data_dir=spec.data_dir,
                           fixed=SiteSplit(spec.state_dir, spec.policy.data))


def set_weights(trainer: Any, weights: Mapping[str, np.ndarray]) -> None:
    """Load NumPy weights into the trainer's model (copied: cached arrays are read-only)."""
    import torch

    trainer.set_weights({k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()})


def norm_keys_of(trainer: Any) -> set[str]:
    """FedBN's keep-local tensor names of the trainer's model."""
    from fedmed.models import norm_parameter_names

    return set(norm_parameter_names(trainer.model))


def train_site(
    cfg: FederationConfig,
    spec: SiteSpec,
    global_weights: Mapping[str, np.ndarray],
    *,
    server_round: int,
    total_rounds: int,
    local_epochs: int,
    mu: float = 0.0,
    own_norm: Mapping[str, np.ndarray] | None = None,
    fedbn: bool = False,
    run_name: str = "run",
) -> tuple[SiteTrainResult, dict[str, np.ndarray] | None]:
    """One round of local training at a site.

    The learning-rate schedule runs over the whole federation: this round's epochs are
    ``(server_round - 1) * local_epochs ...`` of ``total_rounds * local_epochs``. Under DP
    the policy's floor on sigma and its lifetime cap are checked from the case count
    before any image is read.

    Args:
        cfg: the run plan, completed with the site's own settings.
        spec: the site.
        global_weights: the round's global weights.
        server_round: 1-based round number.
        total_rounds: rounds planned (schedule length).
        local_epochs: passes over the site's training cases this round.
        mu: FedProx proximal coefficient (0: none).
        own_norm: FedBN: the site's own normalisation tensors from its last round.
        fedbn: keep normalisation tensors local (reply without them).
        run_name: identifies the run (its own ledger figures, per-run state).

    Returns:
        ``(result, norm)``: what to send, and (FedBN) the site's new normalisation tensors
        to keep.

    Raises:
        RequestRefused: the policy forbids the DP settings or the budget.
        FedMedError: the site's data cannot be loaded or training fails.
    """
    from fedmed.training.trainer import seed_everything

    parts = split_ids(cfg, spec)
    ledgers = ledger_dir(spec, parts)
    check_privacy_budget(cfg, spec, num_cases=len(parts["train"]), local_epochs=local_epochs,
                         total_rounds=total_rounds, ledgers=ledgers, run_name=run_name)
    cases = load_cases(cfg, spec, "train")
    seed = site_seed(cfg, spec.name, server_round)
    seed_everything(seed)
    trainer = build_trainer(cfg, spec, run_name, ledgers)
    weights = {k: np.asarray(v) for k, v in global_weights.items()}
    norm_keys = norm_keys_of(trainer) if fedbn else set()
    if fedbn and own_norm:
        weights.update({k: np.asarray(v) for k, v in own_norm.items() if k in norm_keys})
    set_weights(trainer, weights)
    reference = trainer.get_weights() if mu > 0 else None
    fit = trainer.fit(
        cases, local_epochs, reference=reference, mu=mu,
        start_epoch=(server_round - 1) * local_epochs,
        total_epochs=total_rounds * local_epochs, round_index=server_round, seed=seed,
        plan_epochs=dp_plan_epochs(cfg, total_rounds, local_epochs),
    )
    if fit.skipped:
        return SiteTrainResult(
            weights={}, num_cases=fit.num_cases, loss=float(fit.loss), seconds=fit.seconds,
            epsilon=fit.epsilon, delta=fit.delta, skipped=fit.skipped,
        ), None
    new = {k: v.detach().cpu().numpy() for k, v in trainer.get_weights().items()}
    norm = None
    if fedbn:
        new, norm = split_norm(new, norm_keys)
    return SiteTrainResult(
        weights=new, num_cases=fit.num_cases, loss=float(fit.loss), seconds=fit.seconds,
        epsilon=fit.epsilon, delta=fit.delta,
    ), norm


def evaluate_site(
    cfg: FederationConfig,
    spec: SiteSpec,
    global_weights: Mapping[str, np.ndarray],
    *,
    own_norm: Mapping[str, np.ndarray] | None = None,
    run_name: str = "run",
) -> tuple[Any, int]:
    """Metrics of the global model on the site's validation cases.

    With FedBN the site's own normalisation tensors replace the global ones. The policy's
    k is checked on the number of validation cases before any image is read.

    Returns:
        ``(EvalResult, number of validation cases)``.

    Raises:
        RequestRefused: ``too-few-cases-for-metric``.
    """
    parts = split_ids(cfg, spec)
    spec.policy.check_cases_for_metric(len(parts["val"]))
    cases = load_cases(cfg, spec, "val")
    trainer = build_trainer(cfg, spec, run_name, ledger_dir(spec, parts))
    weights = {k: np.asarray(v) for k, v in global_weights.items()}
    if own_norm:
        keys = norm_keys_of(trainer)
        weights.update({k: np.asarray(v) for k, v in own_norm.items() if k in keys})
    set_weights(trainer, weights)
    # The per-round federated evaluation reports Dice; HD95 would double its cost.
    return trainer.evaluate(cases, hd95=False), len(cases)


__all__ = [
    "SiteSpec",
    "SiteTrainResult",
    "build_trainer",
    "check_privacy_budget",
    "dp_plan_epochs",
    "evaluate_site",
    "ledger_dir",
    "load_cases",
    "norm_keys_of",
    "set_weights",
    "simulated_sites",
    "site_for_node",
    "site_from_node_config",
    "site_seed",
    "split_ids",
    "train_site",
]
