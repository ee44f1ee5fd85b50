"""The coordinator's side of secure aggregation (Flower SecAgg+): it sees only the sum.

Flower 1.42 implements SecAgg+ only on its legacy path: the server-side
``SecAggPlusWorkflow`` drives a ``LegacyContext`` (legacy ``FedAvg`` strategy and client
manager). :class:`SecAggCoordinator` is a :class:`~fedmed.federation.coordinator.Coordinator`
whose :meth:`~SecAggCoordinator.train_stage` trains through that workflow; everything else
(federated evaluation over the Message API, central evaluation, ``metrics.jsonl``,
checkpoint and resume, ``model.pt``, ``summary.json``) is the coordinator's own code. The
site's side is :mod:`fedmed.federation.secagg_client`.

Weighting: each site uploads ``[w, w * params]`` masked, with ``w = num_examples /
max_weight`` quantised; the workflow divides the unmasked sum by the summed ``w``, so the
result is FedAvg weighted by training cases, up to quantisation error (bounded in
``tests/support/oracles.py``). The legacy ``FedAvg.aggregate_fit`` then averages identical
copies of that vector, which leaves it unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmed.config import FederationConfig
from fedmed.errors import ConfigError
from fedmed.federation.coordinator import Coordinator
from fedmed.federation.protocol import KEYS_KEY, ROUND_KEY, SITE_KEY, record_bytes, to_record
from fedmed.federation.replies import ERROR_TAIL, finite, reason_code_in

log = logging.getLogger(__name__)

DEFAULT_MAX_WEIGHT = 1000.0
"""SecAgg+ ``max_weight``: the largest number of training cases one site may report."""
SECAGG_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose server side is a weighted mean (what SecAgg+ can compute)."""

MaskedObserver = Callable[[int, list[np.ndarray]], None]


def check_secagg_config(cfg: FederationConfig) -> None:
    """Reject settings that cannot run under secure aggregation.

    Raises:
        ConfigError: compression is on (SecAgg+ quantises the update itself and masks it
            with uniform noise, so a compressed payload would not survive), or the strategy
            needs the individual updates (median, trimmed mean, FedAdam's moments, FedBN).
    """
    if cfg.compression.kind != "none":
        raise ConfigError(
            f"compression.kind is {cfg.compression.kind!r} but secure_aggregation.enabled is "
            "true: SecAgg+ quantises and masks the update itself, so compression must be "
            "off; set compression.kind: none (or disable secure_aggregation)"
        )
    if cfg.federation.strategy not in SECAGG_STRATEGIES:
        raise ConfigError(
            f"federation.strategy is {cfg.federation.strategy!r} but secure_aggregation is "
            f"enabled: the coordinator then only sees the weighted sum of the updates, which "
            f"supports {list(SECAGG_STRATEGIES)}; choose one of them or disable "
            "secure_aggregation"
        )


def _secaggplus_workflow_class() -> type:
    from flwr.server.workflow import SecAggPlusWorkflow

    class ObservedSecAggPlusWorkflow(SecAggPlusWorkflow):  # type: ignore[misc]
        """SecAgg+ that also reports what each site sent at the masked-vector stage.

        ``on_masked(node_id, masked_arrays)`` sees exactly the bytes the coordinator
        receives; ``on_replies(messages)`` gets the stage's replies (site metrics).
        """

        def __init__(
            self, *args: Any, on_masked: MaskedObserver | None = None,
            on_replies: Callable[[list[Any]], None] | None = None, **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.on_masked = on_masked
            self.on_replies = on_replies

        def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
            return bool(super().collect_masked_vectors_stage(
                _ObservingGrid(grid, self.on_masked, self.on_replies),  # type: ignore[arg-type]
                context,
                state,
            ))

    return ObservedSecAggPlusWorkflow


class _ObservingGrid:
    """Forwards to the real grid and shows the replies of ``send_and_receive``."""

    def __init__(
        self, grid: Any, on_masked: MaskedObserver | None,
        on_replies: Callable[[list[Any]], None] | None,
    ) -> None:
        self._grid = grid
        self._on_masked = on_masked
        self._on_replies = on_replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        from flwr.common import bytes_to_ndarray
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
        )

        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if self._on_replies is not None:
            self._on_replies(replies)
        if self._on_masked is not None:
            for msg in replies:
                if msg.has_error():
                    continue
                cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
                masked = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
                self._on_masked(int(msg.metadata.src_node_id), masked)
        return replies


def build_workflow(
    cfg: FederationConfig,
    *,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    on_masked: MaskedObserver | None = None,
    on_replies: Callable[[list[Any]], None] | None = None,
) -> Any:
    """Flower's ``SecAggPlusWorkflow`` configured from ``cfg.secure_aggregation``.

    ``num_shares`` / ``reconstruction_threshold`` follow Flower's convention: a float
    <= 1 is a fraction of the sampled sites, a value > 1 a count (passed as int).
    """
    sa = cfg.secure_aggregation

    def _count_or_fraction(value: float) -> int | float:
        return int(value) if value > 1 else float(value)

    cls = _secaggplus_workflow_class()
    return cls(
        num_shares=_count_or_fraction(sa.num_shares),
        reconstruction_threshold=_count_or_fraction(sa.reconstruction_threshold),
        max_weight=max_weight,
        clipping_range=float(sa.clipping_range),
        quantization_range=int(sa.quantization_range),
        timeout=float(cfg.federation.round_timeout_s),
        on_masked=on_masked,
        on_replies=on_replies,
    )


class SecAggCoordinator(Coordinator):
    """The coordinator with training rounds through SecAgg+ (same run directory, metrics).

    Args:
        cfg, run, resume, on_round, run_name: as :class:`Coordinator`.
        run_config: Flower's run config (kept in the legacy context).
        max_weight: SecAgg+ ``max_weight`` (largest training-case count of a site).
        on_masked: test hook: sees each site's masked vector as the coordinator receives it.

    Raises:
        ConfigError: see :func:`check_secagg_config`.
    """

    def __init__(
        self,
        cfg: FederationConfig,
        run: Any,
        *,
        resume: bool = False,
        on_round: Any = None,
        run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        max_weight: float = DEFAULT_MAX_WEIGHT,
        on_masked: MaskedObserver | None = None,
    ) -> None:
        check_secagg_config(cfg)
        super().__init__(cfg, run, resume=resume, on_round=on_round, run_name=run_name)
        self.run_config = dict(run_config or {})
        self._replies: list[Any] = []
        self.workflow = build_workflow(
            self.cfg, max_weight=max_weight, on_masked=on_masked,
            on_replies=self._replies.extend,
        )
        self._legacy: Any = None

    def _legacy_context(self, grid: Any) -> Any:
        from flwr.app import Context, RecordDict
        from flwr.server import ServerConfig
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.strategy import FedAvg

        fed = self.cfg.federation
        strategy = FedAvg(
            fraction_fit=fed.fraction_train, fraction_evaluate=0.0,
            min_fit_clients=max(2, fed.min_train_sites),
            min_available_clients=max(2, fed.min_available_sites),
            on_fit_config_fn=self._fit_config, accept_failures=True,
        )
        base = Context(
            run_id=int(getattr(getattr(grid, "run", None), "run_id", 0) or 0), node_id=0,
            node_config={}, state=RecordDict(), run_config=dict(self.run_config),
        )
        return LegacyContext(
            context=base, config=ServerConfig(num_rounds=self.rounds), strategy=strategy
        )

    def _fit_config(self, server_round: int) -> dict[str, Any]:
        config = dict(self.request_config())
        config[ROUND_KEY] = server_round
        config[KEYS_KEY] = json.dumps(self._keys)
        return config

    def run_rounds(self, grid: Any) -> dict[str, Any]:
        """All rounds; keeps Flower's legacy client manager in sync with the grid meanwhile."""
        from flwr.server.compat.app_utils import start_update_client_manager_thread

        self._legacy = self._legacy_context(grid)
        thread, stop, ready = start_update_client_manager_thread(
            grid, self._legacy.client_manager
        )
        ready.wait()
        try:
            return super().run_rounds(grid)
        finally:
            stop.set()
            thread.join(timeout=10)

    def train_stage(
        self, grid: Any, server_round: int, arrays: dict[str, np.ndarray], line: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """One SecAgg+ training round; the evaluation stage is the coordinator's own."""
        from flwr.app import ConfigRecord
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        ctx = self._legacy
        self._keys = list(arrays)
        record = to_record(arrays)
        ctx.state.array_records[MAIN_PARAMS_RECORD] = record
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()}
        )
        self._replies.clear()
        self.workflow(grid, ctx)
        line["secure_aggregation"] = True
        self._round_line(line)
        result = ctx.state.array_records[MAIN_PARAMS_RECORD]
        line["bytes_sent"] = record_bytes(record) * len(line["sites_trained"] or [1])
        if result is record:
            log.warning("round %d: secure aggregation halted (too few sites); the global "
                        "model is unchanged", server_round)
            line["secure_aggregation_halted"] = True
            return arrays
        values = [a.numpy() for a in result.values()]
        return {
            k: np.asarray(v).astype(arrays[k].dtype, copy=False).reshape(arrays[k].shape)
            for k, v in zip(self._keys, values, strict=True)
        }

    def _round_line(self, line: dict[str, Any]) -> None:
        """Site metrics of the masked-vector stage (never the updates: they are masked)."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
        )

        trained: list[str] = []
        failed: dict[str, str] = {}
        refused: dict[str, str] = {}
        num: dict[str, int] = {}
        eps: dict[str, float] = {}
        losses: list[tuple[float, int]] = []
        received = 0
        for msg in self._replies:
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                text = str(msg.error.reason)
                code = reason_code_in(text)
                if code is not None:
                    refused[node] = code
                else:
                    failed[node] = text[-ERROR_TAIL:]
                continue
            fitres = compat.recorddict_to_fitres(msg.content, keep_input=True)
            site = str(fitres.metrics.get(SITE_KEY, node))
            trained.append(site)
            num[site] = int(fitres.num_examples)
            loss = finite(fitres.metrics.get("train-loss"))
            if loss is not None:
                losses.append((loss, int(fitres.num_examples)))
            if fitres.metrics.get("epsilon") is not None:
                eps[site] = float(fitres.metrics["epsilon"])
            cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
            received += sum(len(b) for b in cfg[Key.MASKED_PARAMETERS])
        total = sum(n for _, n in losses)
        line.update({
            "bytes_received": received,
            "sites_trained": sorted(trained),
            "num_examples": dict(sorted(num.items())),
            "train_loss": sum(v * n for v, n in losses) / total if total > 0 else None,
        })
        if failed:
            line["sites_failed"] = failed
        if refused:
            line["sites_refused"] = refused
        if eps:
            line["epsilon"] = eps

    def finish(
        self, arrays: Mapping[str, np.ndarray], history: list[dict[str, Any]], wall: float,
        *, final: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The coordinator's ``model.pt`` + ``summary.json``, marked as securely aggregated.

        The final personalisation round (:meth:`Coordinator.final_stage`) uploads nothing,
        so it goes over the Message API as the evaluation does.
        """
        summary = super().finish(arrays, history, wall, final=final)
        summary["secure_aggregation"] = True
        return self.run.write_summary(summary)


