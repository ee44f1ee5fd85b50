"""FedBN (Li et al. 2021): normalisation layers stay at each site, the rest is averaged.

How fedmed does it (the design choice the issue asked to document):

- The server sends the full global weights (so a site that joins late starts from a
  complete model).
- A site overwrites the received normalisation tensors with its own (kept from its last
  round: in ``context.state`` and, to survive restarts, in ``<state-dir>/fedbn``; see
  :mod:`fedmed.federation.site_state`), trains,
  and replies with **only the shared tensors**: its normalisation layers never leave it.
- :class:`FedBN` averages the shared tensors weighted by cases (FedAvg) and keeps the
  global model's normalisation tensors untouched. The global model (central evaluation,
  ``model.pt``) therefore uses the initial normalisation parameters (affine weight 1,
  bias 0: plain instance/group normalisation); each site evaluates with its own.

"Normalisation tensors" are :func:`fedmed.models.norm_parameter_names` of the model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


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


__all__ = ["FedBN"]
