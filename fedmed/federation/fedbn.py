"""FedBN (Li et al. 2021): normalisation layers stay at each site, the rest is averaged.

How fedmed does it (the design choice the issue asked to document):

- The server sends the full global weights (so a site that joins late starts from a
  complete model).
- A site overwrites the received normalisation tensors with its own (kept from its last
  round: in ``context.state`` and, to survive restarts, in ``<state-dir>/fedbn``), trains,
  and replies with **only the shared tensors**: its normalisation layers never leave it.
- :class:`FedBN` averages the shared tensors weighted by cases (FedAvg) and keeps the
  global model's normalisation tensors untouched. The global model (central evaluation,
  ``model.pt``) therefore uses the initial normalisation parameters (affine weight 1,
  bias 0: plain instance/group normalisation); each site evaluates with its own.

"Normalisation tensors" are :func:`fedmed.models.norm_parameter_names` of the model.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

FEDBN_DIR = "fedbn"
_FILE = re.compile(r"^norm-round(\d+)\.npz$")


def split_norm(
    weights: Mapping[str, np.ndarray], norm_keys: Collection[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(shared, norm)``: the weights split by whether their name is a normalisation key."""
    shared = {k: v for k, v in weights.items() if k not in norm_keys}
    norm = {k: v for k, v in weights.items() if k in norm_keys}
    return shared, norm


class FedBN(FedAvg):
    """FedAvg over the shared tensors; normalisation tensors stay at the sites.

    Args:
        norm_keys: names of the normalisation tensors (never aggregated).
        **kwargs: passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, norm_keys: Collection[str], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.norm_keys = frozenset(norm_keys)
        self.current_arrays: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global normalisation tensors, then configure as FedAvg."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items() if k in self.norm_keys}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the shared tensors; the global normalisation tensors unchanged."""
        replies = list(replies)
        for msg in replies:
            if msg.has_content():
                for rec in msg.content.array_records.values():
                    for k in [k for k in rec if k in self.norm_keys]:
                        del rec[k]  # a site that sent them anyway: ignore them
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        merged = ArrayRecord()
        for k, v in (self.current_arrays or {}).items():
            merged[k] = Array(np.asarray(v))
        for k in arrays:
            merged[k] = arrays[k]
        return merged, metrics


# -- the site side: its own normalisation tensors, per round, on disk -----------------------


def save_site_norm(state_dir: Path, server_round: int, norm: Mapping[str, np.ndarray]) -> Path:
    """Store a site's normalisation tensors after ``server_round`` (atomic; keeps the last 2).

    Per-round files make a resumed round reproducible: a round that is re-run after a
    coordinator restart starts from the tensors of the round before it, not its own.
    """
    d = state_dir / FEDBN_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"norm-round{server_round:05d}.npz"
    tmp = d / f".norm-round{server_round:05d}.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in norm.items()})  # type: ignore[arg-type]
    tmp.replace(path)
    rounds = sorted(_rounds(d))
    for r in rounds[:-2]:
        (d / f"norm-round{r:05d}.npz").unlink(missing_ok=True)
    return path


def _rounds(d: Path) -> list[int]:
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = _FILE.match(p.name)
            if m:
                out.append(int(m.group(1)))
    return out


def load_site_norm(state_dir: Path, before_round: int) -> dict[str, np.ndarray] | None:
    """The site's normalisation tensors of the latest round before ``before_round``, if any."""
    d = state_dir / FEDBN_DIR
    rounds = [r for r in _rounds(d) if r < before_round]
    if not rounds:
        return None
    with np.load(d / f"norm-round{max(rounds):05d}.npz") as data:
        return {k: data[k] for k in data.files}


__all__ = ["FedBN", "load_site_norm", "save_site_norm", "split_norm"]
