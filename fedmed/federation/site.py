"""The site side of the federation: everything a ClientApp does.

:func:`train_site` and :func:`evaluate_site` are plain functions (config, site, NumPy
weights in; NumPy weights and numbers out) so they can be tested and reused without
Flower; :func:`handle_train` / :func:`handle_evaluate` translate Flower messages to and from
them, and :func:`make_client_app` wires them into a ``ClientApp``.

Where a site's settings come from (same code in simulation and deployment):

- Deployment: the SuperNode's node config, ``flower-supernode --node-config
  "data-dir='/data/site' site-name='hospital-a' device='cuda' cache-dir='...'
  state-dir='/var/lib/fedmed'"``; only ``data-dir`` is required (the site name defaults
  to its folder name).
- Simulation: Flower's ``partition-id`` picks ``cfg.sites[partition_id]``.
- The federation config itself travels in every message from the coordinator (key
  ``fedmed-config``, JSON), so a site needs no copy of the coordinator's YAML; when a
  message lacks it, the run config's ``fedmed-config`` path is read instead.

State that outlives a round: FedBN's normalisation tensors (``context.state`` in process,
``<state-dir>/fedbn`` on disk) and the DP ledger (kept by the trainer in ``state-dir``).
In simulation ``state-dir`` is ``<run-dir>/sites/<site>``.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmed.config import FederationConfig, config_from_dict, load_config
from fedmed.errors import FederationError
from fedmed.federation import compression
from fedmed.federation.fedbn import load_site_norm, save_site_norm, split_norm
from fedmed.training.ledger import safe_name

log = logging.getLogger(__name__)

# Keys of the message protocol between coordinator and sites.
CFG_KEY = "fedmed-config"
ROUND_KEY = "server-round"
TOTAL_ROUNDS_KEY = "total-rounds"
LOCAL_EPOCHS_KEY = "local-epochs"
MU_KEY = "proximal-mu"
STRATEGY_KEY = "strategy"
RUN_NAME_KEY = "run-name"
INFO_KEY = "fedmed"  # reply ConfigRecord: site name, compression metadata, skip reason
METRICS_KEY = "metrics"


@dataclass(frozen=True)
class SiteSpec:
    """Where one site's data, cache and state are.

    Attributes:
        name: the site's name (metrics, ledger).
        data_dir: its data folder; ``None``: ``cfg.site_dir(name)``.
        cache_dir: preprocessed-case cache; ``None``: the data module's default.
        state_dir: state that must survive restarts (FedBN norms, DP ledger).
        device: ``cpu`` / ``cuda`` / ``None`` (the config's ``training.device``).
    """

    name: str
    data_dir: Path | None = None
    cache_dir: Path | None = None
    state_dir: Path | None = None
    device: str | None = None


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


def _opt_path(value: Any) -> Path | None:
    return Path(str(value)).expanduser() if value not in (None, "") else None


def site_from_node_config(
    cfg: FederationConfig,
    node_config: Mapping[str, Any],
    *,
    state_root: Path | None = None,
) -> SiteSpec:
    """The site a node stands for.

    Args:
        cfg: the federation config.
        node_config: Flower's ``context.node_config``: ``data-dir`` (+ optional
            ``site-name``, ``device``, ``cache-dir``, ``state-dir``) in deployment,
            ``partition-id`` in simulation.
        state_root: simulation: per-site state goes to ``state_root / <site>``.

    Raises:
        FederationError: neither ``data-dir`` nor ``partition-id``, or a partition id with
            no matching site.
    """
    device = node_config.get("device") or None
    if node_config.get("data-dir"):
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        name = str(node_config.get("site-name") or data_dir.name)
        state = _opt_path(node_config.get("state-dir"))
        if state is None and state_root is not None:
            state = state_root / name
        return SiteSpec(
            name=name, data_dir=data_dir, cache_dir=_opt_path(node_config.get("cache-dir")),
            state_dir=state, device=None if device is None else str(device),
        )
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(cfg.sites):
            raise FederationError(
                f"simulation partition-id {pid} has no site: the federation config names "
                f"{len(cfg.sites)} sites {cfg.site_names}; run the simulation with "
                f"num-supernodes = {len(cfg.sites)}"
            )
        name = cfg.sites[pid].name
        state = _opt_path(node_config.get("state-dir"))
        if state is None and state_root is not None:
            state = state_root / name
        return SiteSpec(
            name=name, data_dir=None, cache_dir=_opt_path(node_config.get("cache-dir")),
            state_dir=state, device=None if device is None else str(device),
        )
    raise FederationError(
        "this SuperNode has no data-dir in its node config; start it with "
        "--node-config \"data-dir='/path/to/site/data'\" (optional: site-name, device, "
        "cache-dir, state-dir)"
    )


def _site_seed(cfg: FederationConfig, site: str, server_round: int) -> int:
    # Stable across processes (unlike hash()): sites draw different patches, reproducibly.
    return cfg.training.seed + (zlib.crc32(site.encode()) % 100_003) + 1_000_003 * server_round


def _build(cfg: FederationConfig, spec: SiteSpec, run_name: str) -> Any:
    from fedmed.models import build_model
    from fedmed.training.trainer import LocalTrainer

    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    optimizer_state = None
    if spec.state_dir is not None:
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        if cfg.federation.keep_optimizer_state:
            optimizer_state = spec.state_dir / f"optimizer-{safe_name(run_name)}.pt"
    return LocalTrainer(
        cfg, model, device=spec.device, site=spec.name, state_dir=spec.state_dir,
        run_id=run_name, optimizer_state=optimizer_state,
    )


def _load_cases(cfg: FederationConfig, spec: SiteSpec, split: Literal["train", "val"]) -> list[Any]:
    from fedmed.data.dataset import load_site_cases

    return load_site_cases(cfg, spec.name, split, cache_dir=spec.cache_dir, data_dir=spec.data_dir)


def _set_weights(trainer: Any, weights: Mapping[str, np.ndarray]) -> None:
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
    ``(server_round - 1) * local_epochs ...`` of ``total_rounds * local_epochs``.

    Args:
        cfg: the federation config (as sent by the coordinator).
        spec: the site.
        global_weights: the round's global weights.
        server_round: 1-based round number.
        total_rounds: rounds planned (schedule length).
        local_epochs: passes over the site's training cases this round.
        mu: FedProx proximal coefficient (0: none).
        own_norm: FedBN: the site's own normalisation tensors from its last round.
        fedbn: keep normalisation tensors local (reply without them).
        run_name: identifies the run in the DP ledger.

    Returns:
        ``(result, norm)``: what to send, and (FedBN) the site's new normalisation tensors
        to keep.

    Raises:
        FedMedError: the site's data cannot be loaded or training fails.
    """
    from fedmed.training.trainer import seed_everything

    cases = _load_cases(cfg, spec, "train")
    seed = _site_seed(cfg, spec.name, server_round)
    seed_everything(seed)
    trainer = _build(cfg, spec, run_name)
    weights = {k: np.asarray(v) for k, v in global_weights.items()}
    norm_keys = norm_keys_of(trainer) if fedbn else set()
    if fedbn and own_norm:
        weights.update({k: np.asarray(v) for k, v in own_norm.items() if k in norm_keys})
    _set_weights(trainer, weights)
    reference = trainer.get_weights() if mu > 0 else None
    fit = trainer.fit(
        cases, local_epochs, reference=reference, mu=mu,
        start_epoch=(server_round - 1) * local_epochs,
        total_epochs=total_rounds * local_epochs, round_index=server_round, seed=seed,
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

    With FedBN the site's own normalisation tensors replace the global ones.

    Returns:
        ``(EvalResult, number of validation cases)``.

    Raises:
        FederationError: the site has no validation cases.
    """
    cases = _load_cases(cfg, spec, "val")
    if not cases:
        raise FederationError(
            f"site {spec.name}: no validation cases to evaluate on (training.val_fraction "
            f"{cfg.training.val_fraction})"
        )
    trainer = _build(cfg, spec, run_name)
    weights = {k: np.asarray(v) for k, v in global_weights.items()}
    if own_norm:
        keys = norm_keys_of(trainer)
        weights.update({k: np.asarray(v) for k, v in own_norm.items() if k in keys})
    _set_weights(trainer, weights)
    # The per-round federated evaluation reports Dice; HD95 would double its cost.
    return trainer.evaluate(cases, hd95=False), len(cases)


# -- Flower adapters ------------------------------------------------------------------------


def _config_from_message(
    config: Mapping[str, Any], run_config: Mapping[str, Any]
) -> FederationConfig:
    text = config.get(CFG_KEY)
    if isinstance(text, str) and text:
        return config_from_dict(json.loads(text))
    path = run_config.get(CFG_KEY)
    if not path:
        raise FederationError(
            "the coordinator's message carries no federation config and the run config has "
            f"no {CFG_KEY!r} path"
        )
    return load_config(_resolve_app_path(str(path)))


def _resolve_app_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    app_root = Path(__file__).resolve().parents[2]  # the folder holding pyproject.toml
    return app_root / p


def _norm_from_state(state: Any, before_round: int) -> dict[str, np.ndarray] | None:
    """FedBN tensors kept in ``context.state`` from a round before ``before_round``."""
    from flwr.app import ArrayRecord, ConfigRecord

    meta = state.get("fedbn-meta") if "fedbn-meta" in state else None
    arrays = state.get("fedbn-norm") if "fedbn-norm" in state else None
    if isinstance(meta, ConfigRecord) and isinstance(arrays, ArrayRecord):
        kept = meta.get("round", 0)
        if isinstance(kept, int) and kept < before_round:
            return {k: a.numpy() for k, a in arrays.items()}
    return None


def _own_norm(context: Any, spec: SiteSpec, before_round: int) -> dict[str, np.ndarray] | None:
    norm = _norm_from_state(context.state, before_round)
    if norm is None and spec.state_dir is not None:
        norm = load_site_norm(spec.state_dir, before_round)
    return norm


def _keep_norm(
    context: Any, spec: SiteSpec, server_round: int, norm: dict[str, np.ndarray]
) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    context.state["fedbn-norm"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in norm.items()})
    context.state["fedbn-meta"] = ConfigRecord({"round": server_round})
    if spec.state_dir is not None:
        save_site_norm(spec.state_dir, server_round, norm)


def _received(message: Any) -> tuple[dict[str, np.ndarray], Mapping[str, Any]]:
    content = message.content
    arrays = content["arrays"]
    config = content["config"] if "config" in content else {}
    return {k: a.numpy() for k, a in arrays.items()}, config


def handle_train(message: Any, context: Any, *, state_root: Path | None = None) -> Any:
    """Flower train handler: global weights in, trained (compressed) weights + metrics out.

    Reply: ``arrays`` (ArrayRecord, compressed per ``cfg.compression``), ``metrics``
    (``num-examples`` = training cases, ``train-loss``, ``epsilon``/``delta`` for DP) and
    ``fedmed`` (ConfigRecord: ``site``, compression metadata, ``skipped`` reason). A site
    whose fit is skipped replies without arrays, with the reason.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    global_weights, config = _received(message)
    cfg = _config_from_message(config, context.run_config)
    root = _state_root(context, state_root)
    spec = site_from_node_config(cfg, context.node_config, state_root=root)
    server_round = int(config.get(ROUND_KEY, 1))
    fedbn = str(config.get(STRATEGY_KEY, cfg.federation.strategy)) == "fedbn"
    own = _own_norm(context, spec, server_round) if fedbn else None
    result, norm = train_site(
        cfg, spec, global_weights,
        server_round=server_round,
        total_rounds=int(config.get(TOTAL_ROUNDS_KEY, cfg.federation.rounds)),
        local_epochs=int(config.get(LOCAL_EPOCHS_KEY, cfg.federation.local_epochs)),
        mu=float(config.get(MU_KEY, 0.0)),
        own_norm=own, fedbn=fedbn, run_name=str(config.get(RUN_NAME_KEY, "run")),
    )
    info: dict[str, Any] = {"site": spec.name}
    metrics: dict[str, Any] = {
        "num-examples": int(result.num_cases), "train-loss": float(result.loss),
        "seconds": float(result.seconds),
    }
    if result.epsilon is not None:
        metrics["epsilon"] = float(result.epsilon)
    if result.delta is not None:
        metrics["delta"] = float(result.delta)
    if result.skipped:
        info["skipped"] = result.skipped
        log.warning("site %s: no update this round: %s", spec.name, result.skipped)
        content = RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: ConfigRecord(info)})
        return Message(content, reply_to=message)
    if norm is not None:
        _keep_norm(context, spec, server_round, norm)
    comp = cfg.compression
    payload, meta = compression.compress(result.weights, global_weights, comp.kind, comp.deltas)
    info.update({f"compression-{k}": v for k, v in meta.items()})
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
        METRICS_KEY: MetricRecord(metrics),
        INFO_KEY: ConfigRecord(info),
    })
    return Message(content, reply_to=message)


def handle_evaluate(message: Any, context: Any, *, state_root: Path | None = None) -> Any:
    """Flower evaluate handler: Dice of the global model on the site's validation cases.

    Reply metrics: ``num-examples`` (validation cases), ``dice`` (mean over foreground
    classes), ``dice-<class>`` per class, ``hd95``; ``fedmed`` ConfigRecord names the site.
    """
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    global_weights, config = _received(message)
    cfg = _config_from_message(config, context.run_config)
    root = _state_root(context, state_root)
    spec = site_from_node_config(cfg, context.node_config, state_root=root)
    server_round = int(config.get(ROUND_KEY, 1))
    fedbn = str(config.get(STRATEGY_KEY, cfg.federation.strategy)) == "fedbn"
    own = _own_norm(context, spec, server_round + 1) if fedbn else None
    result, n = evaluate_site(
        cfg, spec, global_weights, own_norm=own, run_name=str(config.get(RUN_NAME_KEY, "run"))
    )
    metrics: dict[str, Any] = {"num-examples": int(n), "dice": _num(result.dice_mean),
                               "hd95": _num(result.hd95_mean)}
    for cls, value in result.dice_per_class.items():
        metrics[f"dice-{cls}"] = _num(value)
    content = RecordDict({
        METRICS_KEY: MetricRecord(metrics), INFO_KEY: ConfigRecord({"site": spec.name}),
    })
    return Message(content, reply_to=message)


def _num(value: float) -> float:
    # MetricRecord values must be numbers; NaN (e.g. a class absent everywhere) stays NaN.
    return float(value)


def _state_root(context: Any, state_root: Path | None) -> Path | None:
    if state_root is not None:
        return state_root
    run_dir = context.run_config.get("run-dir") if context.run_config else None
    # Only in simulation does the coordinator's run folder exist on the site's machine.
    if run_dir and "partition-id" in context.node_config:
        return _resolve_app_path(str(run_dir)) / "sites"
    return None


def make_client_app(*, state_root: Path | None = None) -> Any:
    """The fedmed ``ClientApp``.

    Args:
        state_root: simulation: keep each site's state under ``state_root / <site>``
            (default: ``<run-dir>/sites`` from the run config in simulation, the node
            config's ``state-dir`` in deployment).
    """
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(message: Any, context: Any) -> Any:
        from fedmed.federation import secagg

        if secagg.is_secagg_message(message):  # a SecAgg+ stage (secure_aggregation on)
            return secagg.handle_secagg_train(message, context, state_root=state_root)
        return handle_train(message, context, state_root=state_root)

    @app.evaluate()
    def _evaluate(message: Any, context: Any) -> Any:
        return handle_evaluate(message, context, state_root=state_root)

    return app


__all__ = [
    "SiteSpec",
    "SiteTrainResult",
    "evaluate_site",
    "handle_evaluate",
    "handle_train",
    "make_client_app",
    "norm_keys_of",
    "site_from_node_config",
    "train_site",
]
