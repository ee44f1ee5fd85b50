"""Aggregation rules written out in plain NumPy: the references the strategies are held to.

The coordinator aggregates with Flower's own strategy classes (see
:mod:`fedmed.federation.strategies`); these functions state, independently and readably,
what each strategy must compute, so that tests can compare Flower's result with them and a
reader can see the mathematics without reading Flower. Weights are ``name -> ndarray``
mappings; site weights are numbers of training cases (patients).

Also the secure-aggregation references: :func:`quantisation_error_bound` (how far SecAgg+'s
result may lie from plain FedAvg) and :func:`correlation` (how much a masked vector says
about the update it hides).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

Weights = Mapping[str, np.ndarray]


def _keys(updates: Sequence[Weights]) -> list[str]:
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = list(updates[0])
    for u in updates[1:]:
        if set(u) != set(keys):
            raise ValueError("updates have different keys")
    return keys


def weighted_mean(updates: Sequence[Weights], num_cases: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg / FedProx: ``sum_i n_i w_i / sum_i n_i`` per tensor."""
    keys = _keys(updates)
    n = np.asarray(num_cases, dtype=np.float64)
    if n.shape != (len(updates),) or n.sum() <= 0:
        raise ValueError("need one positive weight per update")
    f = n / n.sum()
    return {
        k: sum(fi * np.asarray(u[k], dtype=np.float64) for fi, u in zip(f, updates, strict=True))
        for k in keys
    }


def elementwise_median(updates: Sequence[Weights]) -> dict[str, np.ndarray]:
    """FedMedian: the coordinate-wise median (unweighted)."""
    keys = _keys(updates)
    return {k: np.median(np.stack([np.asarray(u[k]) for u in updates]), axis=0) for k in keys}


def trimmed_mean(updates: Sequence[Weights], beta: float) -> dict[str, np.ndarray]:
    """FedTrimmedAvg: per coordinate, the mean without the ``int(beta * n)`` extremes.

    The lowest and the highest ``int(beta * n)`` values are dropped (unweighted).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError("beta must be in [0, 0.5)")
    keys = _keys(updates)
    cut = int(beta * len(updates))
    out = {}
    for k in keys:
        s = np.sort(np.stack([np.asarray(u[k], dtype=np.float64) for u in updates]), axis=0)
        out[k] = s[cut : len(updates) - cut].mean(axis=0)
    return out


def fedadam_step(
    current: Weights,
    aggregated: Weights,
    m: Weights | None,
    v: Weights | None,
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
    server_round: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedAdam server step (Reddi et al. 2021), with Flower's bias-corrected step size.

    ``d = avg - x``; ``m = b1 m + (1-b1) d``; ``v = b2 v + (1-b2) d^2``;
    ``x' = x + eta_t m / (sqrt(v) + tau)`` with
    ``eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``.

    Returns:
        ``(new_weights, m, v)``.
    """
    new, m2, v2 = {}, {}, {}
    eta_t = eta * np.sqrt(1 - beta_2 ** (server_round + 1.0)) / (1 - beta_1 ** (server_round + 1.0))
    for k, x in current.items():
        d = np.asarray(aggregated[k]) - np.asarray(x)
        m2[k] = beta_1 * (m[k] if m else 0.0) + (1 - beta_1) * d
        v2[k] = beta_2 * (v[k] if v else 0.0) + (1 - beta_2) * d**2
        new[k] = np.asarray(x) + eta_t * m2[k] / (np.sqrt(v2[k]) + tau)
    return new, m2, v2


def fedyogi_step(
    current: Weights,
    aggregated: Weights,
    m: Weights | None,
    v: Weights | None,
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedYogi server step.

    Like FedAdam but ``v = v - (1-b2) d^2 sign(v - d^2)`` and no bias correction.

    Returns:
        ``(new_weights, m, v)``.
    """
    new, m2, v2 = {}, {}, {}
    for k, x in current.items():
        d = np.asarray(aggregated[k]) - np.asarray(x)
        m2[k] = beta_1 * (m[k] if m else 0.0) + (1 - beta_1) * d
        v_prev = v[k] if v else np.zeros_like(d)
        v2[k] = v_prev - (1 - beta_2) * d**2 * np.sign(v_prev - d**2)
        new[k] = np.asarray(x) + eta * m2[k] / (np.sqrt(v2[k]) + tau)
    return new, m2, v2


def fedbn_merge(
    aggregated_shared: Weights, current: Weights, norm_keys: Collection[str]
) -> dict[str, np.ndarray]:
    """FedBN's global model: aggregated shared tensors, normalisation tensors untouched.

    Each site keeps its own normalisation tensors and never sends them.
    """
    out = {k: np.asarray(v) for k, v in current.items() if k in norm_keys}
    out.update({k: np.asarray(v) for k, v in aggregated_shared.items() if k not in norm_keys})
    return out


__all__ = [
    "elementwise_median",
    "fedadam_step",
    "fedbn_merge",
    "fedyogi_step",
    "trimmed_mean",
    "weighted_mean",
]


def quantisation_error_bound(
    cfg: Any, total_examples: int, max_weight: float = 1000.0
) -> float:
    """An upper bound on ``|secure aggregate - plain FedAvg|`` per weight.

    Each site's ``w * params`` is stochastically rounded to a grid of step
    ``2 * clipping_range / quantization_range`` (error < one step), and the sum is divided
    by ``sum(w) = total_examples / max_weight``; the weights' own rounding adds a relative
    error of the same order.
    """
    sa = cfg.secure_aggregation
    step = 2.0 * sa.clipping_range / sa.quantization_range
    return 2.0 * step * max_weight * max(1, len(cfg.sites)) / max(1, total_examples)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flattened vectors (``nan`` when one is constant)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else math.nan
