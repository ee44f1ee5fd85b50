"""Flower strategies built from the federation config.

Every strategy is one of Flower's own message-API classes (``flwr.serverapp.strategy``);
only FedBN is a subclass (:class:`fedmed.federation.fedbn.FedBN`). Weights are numbers of
training cases: sites report them as ``num-examples`` (patients, never batches).

Strategy state that must survive a coordinator restart (FedAdam/FedYogi moments) is read
and restored by :func:`strategy_state` / :func:`restore_strategy_state`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedmed.config import FederationConfig
from fedmed.errors import ConfigError
from fedmed.federation.fedbn import FedBN
from fedmed.federation.protocol import ARRAYS_KEY, CONFIG_KEY, WEIGHT_KEY

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "fedbn")

# Attributes of Flower's strategies that change as rounds go by (FedOpt family).
_STATEFUL = ("m_t", "v_t")


def build_strategy(
    cfg: FederationConfig,
    *,
    strategy: str | None = None,
    norm_keys: Collection[str] | None = None,
) -> Strategy:
    """The Flower strategy that ``cfg.federation`` describes.

    Args:
        cfg: the federation config (``federation`` section; ``training.learning_rate`` is
            FedOpt's client learning rate ``eta_l``, informational in Flower).
        strategy: overrides ``cfg.federation.strategy``.
        norm_keys: FedBN's normalisation tensor names (required for ``fedbn``).

    Raises:
        ConfigError: unknown strategy, FedBN without ``norm_keys``, or minimum site numbers
            that contradict each other.
    """
    fed = cfg.federation
    name = (strategy or fed.strategy).lower()
    if name not in STRATEGIES:
        raise ConfigError(
            f"federation.strategy must be one of {list(STRATEGIES)}, got {name!r}"
        )
    if fed.min_available_sites < fed.min_train_sites:
        raise ConfigError(
            f"federation.min_available_sites ({fed.min_available_sites}) must be at least "
            f"federation.min_train_sites ({fed.min_train_sites})"
        )
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0 if fed.evaluate_sites else 0.0,
        "min_train_nodes": fed.min_train_sites,
        "min_evaluate_nodes": fed.min_train_sites,
        "min_available_nodes": fed.min_available_sites,
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
    }
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    if name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        return cls(
            **common,
            eta=fed.server_learning_rate,
            eta_l=cfg.training.learning_rate,
            beta_1=fed.server_beta_1,
            beta_2=fed.server_beta_2,
            tau=fed.server_tau,
        )
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=fed.trim_beta)
    if norm_keys is None:
        raise ConfigError("strategy fedbn needs the model's normalisation tensor names")
    return FedBN(norm_keys, **common)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """What the strategy has accumulated over rounds (FedAdam/FedYogi moments), as NumPy."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for attr in _STATEFUL:
        value = getattr(strategy, attr, None)
        if value:
            out[attr] = {k: np.array(v, copy=True) for k, v in value.items()}
    return out


def restore_strategy_state(
    strategy: Strategy, state: Mapping[str, Mapping[str, np.ndarray]]
) -> None:
    """Put back what :func:`strategy_state` returned (on ``--resume``)."""
    for attr, value in state.items():
        if attr in _STATEFUL and hasattr(strategy, attr):
            setattr(strategy, attr, {k: np.asarray(v) for k, v in value.items()})


__all__ = ["STRATEGIES", "build_strategy", "restore_strategy_state", "strategy_state"]
