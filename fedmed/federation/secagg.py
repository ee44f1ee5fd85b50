"""Secure aggregation (Flower SecAgg+): the coordinator only ever sees the sum of updates.

Flower 1.41 implements SecAgg+ only on its legacy path: the server-side
``SecAggPlusWorkflow`` drives a ``LegacyContext`` (legacy ``FedAvg`` strategy and client
manager) and the site side is ``secaggplus_mod`` around a legacy ``Client``. This module is
the glue that lets fedmed use it without a second training code path:

- Site: :func:`handle_secagg_train` runs ``secaggplus_mod`` around :class:`SecAggSiteClient`,
  a ``NumPyClient`` whose ``fit`` calls the same :func:`fedmed.federation.site.train_site`
  as the plain handler (patient-level DP included: it happens inside the trainer, SecAgg+
  only hides its result). :func:`is_secagg_message` tells the ClientApp which path a
  message belongs to, so one ClientApp serves both modes.
- Coordinator: :class:`SecAggCoordinator` is a :class:`~fedmed.federation.coordinator.
  Coordinator` whose ``run_round`` trains through ``SecAggPlusWorkflow``; everything else
  (federated evaluation over the Message API, central evaluation, ``metrics.jsonl``,
  checkpoint and resume, ``model.pt``, ``summary.json``) is the coordinator's own code.

Weighting: each site uploads ``[w, w * params]`` masked, with ``w = num_examples /
max_weight`` quantised; the workflow divides the unmasked sum by the summed ``w``, so the
result is FedAvg weighted by training cases, up to quantisation error (see
:func:`quantisation_error_bound`). The legacy ``FedAvg.aggregate_fit`` then averages
identical copies of that vector, which leaves it unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import FederationConfig
from fedmed.errors import ConfigError, FederationError
from fedmed.federation.coordinator import Coordinator, _finite, record_bytes
from fedmed.federation.site import (
    LOCAL_EPOCHS_KEY,
    MU_KEY,
    ROUND_KEY,
    RUN_NAME_KEY,
    TOTAL_ROUNDS_KEY,
    _config_from_message,
    _state_root,
    site_from_node_config,
    train_site,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_WEIGHT = 1000.0
"""SecAgg+ ``max_weight``: the largest number of training cases one site may report."""
SECAGG_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose server side is a weighted mean (what SecAgg+ can compute)."""
SITE_METRIC = "site"
KEYS_KEY = "fedmed-keys"
"""FitIns config key: JSON list of the weight names, in the order of the parameters."""

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


def quantisation_error_bound(
    cfg: FederationConfig, total_examples: int, max_weight: float = DEFAULT_MAX_WEIGHT
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


# -- site side -----------------------------------------------------------------------------


def is_secagg_message(message: Any) -> bool:
    """Whether a train message belongs to the SecAgg+ protocol (any of its four stages)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in message.content.config_records


class SecAggSiteClient:
    """The legacy ``NumPyClient`` a site runs under SecAgg+; trains with ``train_site``.

    Args:
        context: the ClientApp's Flower context (node config, run config).
        state_root: simulation: per-site state under ``state_root / <site>``.
    """

    def __init__(self, context: Any, state_root: Path | None = None) -> None:
        self.context = context
        self.state_root = state_root

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train on the global weights (given in the coordinator's key order).

        Raises:
            FederationError: the site made no update (e.g. its privacy budget is spent):
                under SecAgg+ it then counts as dropped out for this round, and the other
                sites' masks are still removed.
        """
        cfg = _config_from_message(config, self.context.run_config)
        spec = site_from_node_config(
            cfg, self.context.node_config,
            state_root=_state_root(self.context, self.state_root),
        )
        keys = json.loads(str(config[KEYS_KEY]))
        if len(keys) != len(parameters):
            raise FederationError(
                f"site {spec.name}: the coordinator sent {len(parameters)} arrays for "
                f"{len(keys)} names"
            )
        global_weights = {k: np.asarray(p) for k, p in zip(keys, parameters, strict=True)}
        server_round = int(config.get(ROUND_KEY, 1))
        result, _ = train_site(
            cfg, spec, global_weights, server_round=server_round,
            total_rounds=int(config.get(TOTAL_ROUNDS_KEY, cfg.federation.rounds)),
            local_epochs=int(config.get(LOCAL_EPOCHS_KEY, cfg.federation.local_epochs)),
            mu=float(config.get(MU_KEY, 0.0)), run_name=str(config.get(RUN_NAME_KEY, "run")),
        )
        if result.skipped:
            raise FederationError(f"site {spec.name}: no update this round: {result.skipped}")
        metrics: dict[str, Any] = {
            SITE_METRIC: spec.name, "train-loss": float(result.loss),
            "seconds": float(result.seconds),
        }
        if result.epsilon is not None:
            metrics["epsilon"] = float(result.epsilon)
        if result.delta is not None:
            metrics["delta"] = float(result.delta)
        # float64: SecAgg+ multiplies by the weight and quantises in float anyway.
        out = [np.asarray(result.weights[k], dtype=np.float64) for k in keys]
        return out, int(result.num_cases), metrics

    def to_client(self) -> Any:
        """This client as Flower's legacy ``Client``."""
        from flwr.client import NumPyClient

        outer = self

        class _Client(NumPyClient):  # type: ignore[misc]
            def fit(self, parameters: Any, config: Any) -> Any:
                return outer.fit(parameters, config)

        return _Client().to_client()


def handle_secagg_train(message: Any, context: Any, *, state_root: Path | None = None) -> Any:
    """Flower train handler for SecAgg+ messages: ``secaggplus_mod`` around the site client.

    The mod keeps the protocol state in ``context.state`` and, at the masked-vector stage,
    calls the client's ``fit`` and replaces its parameters with the masked, quantised
    vector; the unmasked update never leaves the site.
    """
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
    from flwr.client.mod import secaggplus_mod

    def call_next(msg: Any, ctx: Any) -> Any:
        return handle_legacy_message_from_msgtype(
            lambda c: SecAggSiteClient(c, state_root).to_client(), msg, ctx
        )

    return secaggplus_mod(message, context, call_next)


# -- coordinator side ------------------------------------------------------------------------


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
        config = dict(self._config(server_round))
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

    def run_round(
        self, grid: Any, server_round: int, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One SecAgg+ training round, then the coordinator's evaluation of the result."""
        from flwr.app import ConfigRecord
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        from fedmed.federation.coordinator import _to_record

        ctx = self._legacy
        self._keys = list(arrays)
        record = _to_record(arrays)
        ctx.state.array_records[MAIN_PARAMS_RECORD] = record
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()}
        )
        self._replies.clear()
        self.workflow(grid, ctx)
        line: dict[str, Any] = {"round": server_round, "secure_aggregation": True}
        self._round_line(line)
        result = ctx.state.array_records[MAIN_PARAMS_RECORD]
        if result is record:
            log.warning("round %d: secure aggregation halted (too few sites); the global "
                        "model is unchanged", server_round)
            line["secure_aggregation_halted"] = True
            new_arrays = arrays
        else:
            values = [a.numpy() for a in result.values()]
            new_arrays = {
                k: np.asarray(v).astype(arrays[k].dtype, copy=False).reshape(arrays[k].shape)
                for k, v in zip(self._keys, values, strict=True)
            }
        sent = record_bytes(record) * len(line["sites_trained"] or [1])
        line.update(self._evaluate_and_central(grid, server_round, new_arrays, sent))
        return new_arrays, line

    def _round_line(self, line: dict[str, Any]) -> None:
        """Site metrics of the masked-vector stage (never the updates: they are masked)."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
        )

        trained: list[str] = []
        failed: dict[str, str] = {}
        num: dict[str, int] = {}
        eps: dict[str, float] = {}
        losses: list[tuple[float, int]] = []
        received = 0
        for msg in self._replies:
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                failed[node] = str(msg.error.reason)[-500:]
                continue
            fitres = compat.recorddict_to_fitres(msg.content, keep_input=True)
            site = str(fitres.metrics.get(SITE_METRIC, node))
            trained.append(site)
            num[site] = int(fitres.num_examples)
            loss = _finite(fitres.metrics.get("train-loss"))
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
        if eps:
            line["epsilon"] = eps

    def _evaluate_and_central(
        self, grid: Any, server_round: int, arrays: dict[str, np.ndarray], sent: int
    ) -> dict[str, Any]:
        from fedmed.federation.coordinator import _to_record
        from fedmed.federation.strategies import ARRAYS_KEY

        line: dict[str, Any] = {}
        if self.cfg.federation.evaluate_sites:
            # Evaluation is not secret (it reports metrics, not updates): the Message API.
            record = _to_record(arrays)
            messages = list(self.strategy.configure_evaluate(
                server_round, record, self._config(server_round), grid
            ))
            sent += sum(record_bytes(m.content.array_records[ARRAYS_KEY]) for m in messages)
            replies = grid.send_and_receive(
                messages, timeout=self.cfg.federation.round_timeout_s
            ) if messages else []
            self._evaluate_replies(replies, line)
        else:
            line["per_site_dice"] = {}
        line["bytes_sent"] = sent
        central = self.central_evaluate(arrays)
        line["central_dice"] = None if central is None else central["dice_mean"]
        line["central_dice_per_class"] = {} if central is None else central["dice_per_class"]
        line["central_hd95"] = None if central is None else central["hd95_mean"]
        return line

    def finish(
        self, arrays: Mapping[str, np.ndarray], history: list[dict[str, Any]], wall: float
    ) -> dict[str, Any]:
        """The coordinator's ``model.pt`` + ``summary.json``, marked as securely aggregated."""
        summary = super().finish(arrays, history, wall)
        summary["secure_aggregation"] = True
        return self.run.write_summary(summary)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flattened vectors (``nan`` when one is constant)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else math.nan


__all__ = [
    "DEFAULT_MAX_WEIGHT",
    "SecAggCoordinator",
    "SecAggSiteClient",
    "build_workflow",
    "check_secagg_config",
    "correlation",
    "handle_secagg_train",
    "is_secagg_message",
    "quantisation_error_bound",
]

