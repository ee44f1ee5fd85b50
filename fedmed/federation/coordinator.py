"""The coordinator (server side): rounds, central evaluation, checkpoints, run directory.

:class:`Coordinator` drives a Flower strategy round by round through its message API
(``configure_train`` -> ``Grid.send_and_receive`` -> ``aggregate_train`` ->
``configure_evaluate`` -> ... -> ``aggregate_evaluate``), exactly the steps of
``Strategy.start``, written out so that after every round it can

- decompress the sites' replies before aggregation (:mod:`fedmed.federation.compression`),
  set skipped and failed sites aside, and order replies by site (bit-reproducible sums);
- evaluate the global model on the coordinator's held-out test set;
- append one line to ``metrics.jsonl`` (``round``, ``central_dice``,
  ``central_dice_per_class``, ``per_site_dice``, ``train_loss``, ``wall_seconds``,
  ``bytes_sent``, ``bytes_received``, ``sites_trained``, ``epsilon``, ...);
- write ``checkpoint.pt`` atomically (global weights, strategy state such as FedAdam's
  moments, round, history), from which ``--resume`` continues after a restart.

At the end it writes ``model.pt`` and ``summary.json``. :func:`make_server_app` wraps it in
a Flower ``ServerApp`` (``server/app.py``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmed.config import FederationConfig, dump_config, load_config
from fedmed.errors import CheckpointError, FederationError, FedMedError
from fedmed.federation import compression
from fedmed.federation.rundir import RunDir
from fedmed.federation.site import (
    CFG_KEY,
    INFO_KEY,
    LOCAL_EPOCHS_KEY,
    METRICS_KEY,
    RUN_NAME_KEY,
    STRATEGY_KEY,
    TOTAL_ROUNDS_KEY,
)
from fedmed.federation.strategies import (
    ARRAYS_KEY,
    WEIGHT_KEY,
    build_strategy,
    restore_strategy_state,
    strategy_state,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "fedmed-coordinator/1"

RoundCallback = Callable[[Mapping[str, Any]], None]


def record_bytes(record: ArrayRecord) -> int:
    """Serialized payload bytes of an ArrayRecord (sum of its arrays' ``data``)."""
    return int(sum(len(a.data) for a in record.values()))


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _as_int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _as_float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def resolved_config(cfg: FederationConfig) -> tuple[FederationConfig, tuple[float, float, float]]:
    """``cfg`` with the target spacing fixed (planned from fingerprints when unset).

    The coordinator sends this config to every site, so all of them preprocess alike even
    when they cannot see each other's fingerprints.
    """
    from fedmed.data.preprocess import settings_for

    spacing = settings_for(cfg).target_spacing
    if cfg.preprocessing.target_spacing is None:
        cfg = cfg.with_changes(preprocessing={"target_spacing": list(spacing)})
    return cfg, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


class Coordinator:
    """Runs the rounds of one federated run and writes its run directory.

    Args:
        cfg: the federation config (strategy and rounds already applied).
        run: the run directory (created, ``config.yaml`` written).
        resume: continue from ``checkpoint.pt`` when there is one.
        on_round: called with each round's metrics line (progress display).
        run_name: identifies the run to the sites (DP ledger).
    """

    def __init__(
        self,
        cfg: FederationConfig,
        run: RunDir,
        *,
        resume: bool = False,
        on_round: RoundCallback | None = None,
        run_name: str | None = None,
    ) -> None:
        from fedmed.models import build_model, norm_parameter_names
        from fedmed.training.trainer import LocalTrainer, seed_everything

        self.cfg, self.target_spacing = resolved_config(cfg)
        self.run = run
        self.resume = resume
        self.on_round = on_round
        self.run_name = run_name or run.path.name
        fed = self.cfg.federation
        self.strategy_name = fed.strategy
        self.rounds = fed.rounds
        seed_everything(self.cfg.training.seed)
        model = build_model(self.cfg.model, len(self.cfg.modalities), self.cfg.num_classes)
        self.norm_keys = sorted(norm_parameter_names(model))
        self.trainer = LocalTrainer(self.cfg, model, site=None)
        self.strategy = build_strategy(self.cfg, norm_keys=self.norm_keys)
        self._central_cases: list[Any] | None = None
        self._cfg_json = json.dumps(self.cfg.model_dump(mode="json"))

    # -- checkpoint ----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        """``RUN/checkpoint.pt``."""
        return self.run.path / CHECKPOINT_FILE

    def save_checkpoint(
        self, server_round: int, arrays: Mapping[str, np.ndarray], history: list[dict[str, Any]],
        wall_seconds: float,
    ) -> None:
        """Write the state after ``server_round`` atomically (tmp file + rename)."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "round": server_round,
            "strategy": self.strategy_name,
            "arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
            "strategy_state": {
                attr: {k: torch.from_numpy(np.array(v)) for k, v in vals.items()}
                for attr, vals in strategy_state(self.strategy).items()
            },
            "history": json.dumps(history),
            "wall_seconds": float(wall_seconds),
            "model": json.dumps(self.cfg.model.model_dump(mode="json")),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint of an earlier run of this folder, checked against the config.

        Raises:
            CheckpointError: unreadable, or written with another strategy or model.
        """
        p = self.checkpoint_path
        if not p.is_file():
            return None
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{p}: cannot read the coordinator checkpoint ({type(exc).__name__}: {exc}); "
                "delete it (and metrics.jsonl) to start over, or use --force"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{p}: not a fedmed coordinator checkpoint")
        if payload["strategy"] != self.strategy_name:
            raise CheckpointError(
                f"--resume: {p} was written by strategy {payload['strategy']!r}, the config "
                f"asks for {self.strategy_name!r}; resume with --strategy {payload['strategy']}"
            )
        if json.loads(payload["model"]) != self.cfg.model.model_dump(mode="json"):
            raise CheckpointError(
                f"--resume: {p} holds a model built with another model config; resume with "
                "the config the run started with (RUN/config.yaml)"
            )
        return payload

    # -- evaluation ------------------------------------------------------------------------

    def _set_global(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.trainer.set_weights(
            {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
        )

    def central_evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Metrics of ``arrays`` on the coordinator's held-out test set (``central_test``).

        ``None`` when the config has none.
        """
        if self.cfg.central_test is None:
            return None
        if self._central_cases is None:
            from fedmed.data.dataset import load_test_cases

            self._central_cases = load_test_cases(self.cfg, self.cfg.resolve(self.cfg.central_test))
        self._set_global(arrays)
        # Per round only Dice is plotted; HD95 comes with the final evaluation.
        return self.trainer.evaluate(self._central_cases, hd95=False).as_dict()

    def final_evaluation(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Central test set, each site's test split and unseen sites (summary fields)."""
        self._set_global(arrays)
        try:
            from fedmed.evaluation.evaluate import evaluate_everywhere
        except ImportError:
            evaluate_everywhere = None  # type: ignore[assignment]
        if evaluate_everywhere is not None:
            try:
                return dict(evaluate_everywhere(self.trainer, self.cfg))
            except FedMedError as exc:
                log.warning("final evaluation failed: %s", exc)
        central = self.central_evaluate(arrays) or {}
        return {
            "dice_mean": central.get("dice_mean"),
            "dice_per_class": central.get("dice_per_class", {}),
            "hd95_mean": central.get("hd95_mean"),
            "central": central, "per_site": {}, "unseen": {},
        }

    # -- one round -----------------------------------------------------------------------

    def _config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({
            CFG_KEY: self._cfg_json,
            TOTAL_ROUNDS_KEY: self.rounds,
            LOCAL_EPOCHS_KEY: self.cfg.federation.local_epochs,
            STRATEGY_KEY: self.strategy_name,
            RUN_NAME_KEY: self.run_name,
        })

    def _clean_train_replies(
        self, replies: Iterable[Message], reference: Mapping[str, np.ndarray], line: dict[str, Any]
    ) -> list[Message]:
        """Decompressed replies with only what the strategy aggregates, ordered by site."""
        kept: list[tuple[str, Message]] = []
        failed: dict[str, str] = {}
        skipped: dict[str, str] = {}
        epsilon: dict[str, float] = {}
        num: dict[str, int] = {}
        received = 0
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                failed[node] = str(msg.error.reason)[-500:]
                continue
            content = msg.content
            info = content.config_records.get(INFO_KEY, ConfigRecord())
            site = str(info.get("site", node))
            metrics = content.metric_records.get(METRICS_KEY, MetricRecord())
            if metrics.get("epsilon") is not None:
                epsilon[site] = float(_as_float(metrics["epsilon"]))
            if "skipped" in info:
                skipped[site] = str(info["skipped"])
                continue
            if ARRAYS_KEY not in content.array_records:
                failed[site] = "reply without weights"
                continue
            record = content.array_records[ARRAYS_KEY]
            received += record_bytes(record)
            meta = {
                k.removeprefix("compression-"): v for k, v in info.items()
                if k.startswith("compression-")
            }
            try:
                weights = compression.decompress(_to_numpy(record), meta, reference)
            except FederationError as exc:
                failed[site] = f"cannot decompress its update: {exc}"
                continue
            n = _as_int(metrics.get(WEIGHT_KEY, 0))
            if n <= 0:
                failed[site] = f"reported {n} training cases"
                continue
            num[site] = n
            # The strategy sees exactly one ArrayRecord and one MetricRecord with the same
            # keys at every site (Flower's consistency check), whatever else sites report.
            msg.content = RecordDict({
                ARRAYS_KEY: _to_record(weights),
                METRICS_KEY: MetricRecord(
                    {WEIGHT_KEY: n, "train-loss": _as_float(metrics.get("train-loss", math.nan))}
                ),
            })
            kept.append((site, msg))
        kept.sort(key=lambda t: t[0])
        line.update({
            "bytes_received": received,
            "sites_trained": [s for s, _ in kept],
            "num_examples": dict(sorted(num.items())),
        })
        if failed:
            line["sites_failed"] = failed
        if skipped:
            line["sites_skipped"] = skipped
        if epsilon:
            line["epsilon"] = epsilon
        return [m for _, m in kept]

    def _evaluate_replies(self, replies: Iterable[Message], line: dict[str, Any]) -> None:
        per_site: dict[str, float | None] = {}
        weights: dict[str, int] = {}
        failed: dict[str, str] = {}
        for msg in replies:
            if msg.has_error():
                failed[str(msg.metadata.src_node_id)] = str(msg.error.reason)[-500:]
                continue
            content = msg.content
            info = content.config_records.get(INFO_KEY, ConfigRecord())
            site = str(info.get("site", msg.metadata.src_node_id))
            metrics = content.metric_records.get(METRICS_KEY, MetricRecord())
            per_site[site] = _finite(metrics.get("dice"))
            weights[site] = _as_int(metrics.get(WEIGHT_KEY, 0))
        line["per_site_dice"] = dict(sorted(per_site.items()))
        valid = [(d, weights[s]) for s, d in per_site.items() if d is not None]
        total = sum(w for _, w in valid)
        line["federated_dice"] = sum(d * w for d, w in valid) / total if total > 0 else None
        if failed:
            line["sites_failed_evaluation"] = failed

    def run_round(
        self, grid: Any, server_round: int, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Train, aggregate, evaluate one round; returns the new global weights and its line."""
        timeout = self.cfg.federation.round_timeout_s
        line: dict[str, Any] = {"round": server_round}
        # Seeded per round so that node sampling (fraction_train < 1) repeats on resume.
        random.seed(self.cfg.training.seed * 100_003 + server_round)
        record = _to_record(arrays)
        messages = list(
            self.strategy.configure_train(server_round, record, self._config(server_round), grid)
        )
        sent = sum(record_bytes(m.content.array_records[ARRAYS_KEY]) for m in messages)
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        cleaned = self._clean_train_replies(replies, arrays, line)
        new_arrays = arrays
        if cleaned:
            agg, agg_metrics = self.strategy.aggregate_train(server_round, cleaned)
            if agg is not None:
                new_arrays = _to_numpy(agg)
            if agg_metrics is not None:
                line["train_loss"] = _finite(agg_metrics.get("train-loss"))
        else:
            log.warning("round %d: no site sent an update; the global model is unchanged",
                        server_round)
        line.setdefault("train_loss", None)
        if self.cfg.federation.evaluate_sites:
            record = _to_record(new_arrays)
            messages = list(
                self.strategy.configure_evaluate(
                    server_round, record, self._config(server_round), grid
                )
            )
            sent += sum(record_bytes(m.content.array_records[ARRAYS_KEY]) for m in messages)
            replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
            self._evaluate_replies(replies, line)
        else:
            line["per_site_dice"] = {}
        line["bytes_sent"] = sent
        central = self.central_evaluate(new_arrays)
        line["central_dice"] = None if central is None else central["dice_mean"]
        line["central_dice_per_class"] = {} if central is None else central["dice_per_class"]
        line["central_hd95"] = None if central is None else central["hd95_mean"]
        return new_arrays, line

    # -- the whole run -----------------------------------------------------------------------

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The initial global weights (the seeded model's)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.trainer.get_weights().items()}

    def run_rounds(self, grid: Any) -> dict[str, Any]:
        """All rounds (from the checkpoint on ``resume``), then ``model.pt`` + ``summary.json``.

        Returns:
            The summary written to ``summary.json``.
        """
        arrays = self.initial_arrays()
        history: list[dict[str, Any]] = []
        start_round, wall_before = 1, 0.0
        ckpt = self.load_checkpoint() if self.resume else None
        if ckpt is not None:
            arrays = {k: v.numpy() for k, v in ckpt["arrays"].items()}
            saved = ckpt["strategy_state"]
            restore_strategy_state(
                self.strategy, {a: {k: t.numpy() for k, t in v.items()} for a, v in saved.items()}
            )
            history = list(json.loads(ckpt["history"]))
            start_round = int(ckpt["round"]) + 1
            wall_before = float(ckpt["wall_seconds"])
            log.info("resuming %s after round %d", self.run.path, start_round - 1)
        elif self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
        # metrics.jsonl holds exactly the finished rounds (a crash may have left a line of an
        # unfinished one behind).
        self.run.metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        started = time.perf_counter()
        for server_round in range(start_round, self.rounds + 1):
            t0 = time.perf_counter()
            arrays, line = self.run_round(grid, server_round, arrays)
            line["round_seconds"] = time.perf_counter() - t0
            line["wall_seconds"] = wall_before + time.perf_counter() - started
            self.run.append_metrics(line)
            history.append(json.loads(self.run.metrics_path.read_text().splitlines()[-1]))
            self.save_checkpoint(server_round, arrays, history, line["wall_seconds"])
            if self.on_round is not None:
                self.on_round(line)
            else:
                log.info("round %d/%d: central Dice %s, loss %s, %.1f s", server_round,
                         self.rounds, line["central_dice"], line["train_loss"],
                         line["round_seconds"])
        wall = wall_before + time.perf_counter() - started
        return self.finish(arrays, history, wall)

    def finish(
        self, arrays: Mapping[str, np.ndarray], history: list[dict[str, Any]], wall: float
    ) -> dict[str, Any]:
        """Write ``model.pt`` and ``summary.json``; returns the summary."""
        from fedmed.training.checkpoint import save_model

        weights = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
        save_model(
            self.run.model_path, weights, self.cfg, self.target_spacing,
            mode="federated", strategy=self.strategy_name, rounds=self.rounds,
        )
        ev = self.final_evaluation(arrays)
        epsilon: dict[str, float] = {}
        for h in history:
            epsilon.update(h.get("epsilon") or {})
        summary: dict[str, Any] = {
            "mode": "federated",
            "strategy": self.strategy_name,
            "rounds": self.rounds,
            "dice_mean": ev.get("dice_mean"),
            "dice_per_class": ev.get("dice_per_class", {}),
            "hd95_mean": ev.get("hd95_mean"),
            "per_site": ev.get("per_site", {}),
            "unseen": ev.get("unseen", {}),
            "central": ev.get("central", {}),
            "wall_seconds": wall,
            "sites": self.cfg.site_names,
            "compression": self.cfg.compression.kind,
            "bytes_sent": sum(int(h.get("bytes_sent", 0)) for h in history),
            "bytes_received": sum(int(h.get("bytes_received", 0)) for h in history),
            "central_dice_per_round": [h.get("central_dice") for h in history],
        }
        if epsilon:
            summary["epsilon"] = epsilon
        return self.run.write_summary(summary)


# -- the ServerApp ------------------------------------------------------------------------------


def _run_config_flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def apply_overrides(
    cfg: FederationConfig, *, strategy: str | None = None, rounds: int | None = None
) -> FederationConfig:
    """``cfg`` with ``--strategy`` / ``--rounds`` applied."""
    changes: dict[str, Any] = {}
    if strategy:
        changes["strategy"] = strategy.lower()
    if rounds:
        changes["rounds"] = int(rounds)
    return cfg.with_changes(federation=changes) if changes else cfg


def serve(
    grid: Any,
    run_config: Mapping[str, Any],
    *,
    cfg: FederationConfig | None = None,
    run_dir: Path | None = None,
    resume: bool | None = None,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """The ServerApp's work: config -> coordinator -> rounds -> run directory.

    Args:
        grid: Flower's Grid.
        run_config: Flower's run config (``[tool.flwr.app.config]`` + ``--run-config``):
            ``fedmed-config`` (YAML path), ``run-dir``, ``resume``, ``strategy``, ``rounds``.
        cfg: the config (simulation passes it; else read from ``fedmed-config``).
        run_dir: an already created run directory (simulation); else ``run-dir`` is
            created here.
        resume: overrides the run config's ``resume``.
        on_round: progress callback.

    Raises:
        FedMedError: bad config, run directory in use, resume mismatch.
    """
    from fedmed.federation.site import _resolve_app_path

    do_resume = _run_config_flag(run_config.get("resume", False)) if resume is None else resume
    if run_dir is None:
        if cfg is None:
            path = run_config.get(CFG_KEY)
            if not path:
                raise FederationError(
                    f"the run config has no {CFG_KEY!r}: set it in [tool.flwr.app.config] of "
                    "pyproject.toml or pass --run-config \"fedmed-config='fed.yaml'\""
                )
            cfg = load_config(_resolve_app_path(str(path)))
        cfg = apply_overrides(
            cfg, strategy=str(run_config.get("strategy") or "") or None,
            rounds=int(run_config.get("rounds") or 0) or None,
        )
        target = _resolve_app_path(str(run_config.get("run-dir") or "runs/flwr-run"))
        run = RunDir.create(target, cfg, resume=do_resume)
        if do_resume:
            dump_config(cfg, run.path / "config.yaml")
    else:
        if cfg is None:
            raise FederationError("serve: run_dir given without its config")
        run = RunDir(run_dir)
    if cfg.secure_aggregation.enabled:
        # SecAgg+ lives on Flower's legacy path; same run directory, metrics and summary.
        from fedmed.federation.secagg import SecAggCoordinator

        coordinator: Coordinator = SecAggCoordinator(
            cfg, run, resume=do_resume, on_round=on_round, run_config=run_config
        )
    else:
        coordinator = Coordinator(cfg, run, resume=do_resume, on_round=on_round)
    return coordinator.run_rounds(grid)


def make_server_app(
    *,
    cfg: FederationConfig | None = None,
    run_dir: Path | None = None,
    resume: bool | None = None,
    on_round: RoundCallback | None = None,
) -> Any:
    """The fedmed ``ServerApp`` (``server/app.py`` uses the defaults: all from run config).

    Args:
        cfg: bind a config (simulation); default: the run config's ``fedmed-config``.
        run_dir: bind an already created run directory (simulation).
        resume: bind ``--resume``; default: the run config's ``resume``.
        on_round: progress callback (simulation, in-process).
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        serve(grid, context.run_config, cfg=cfg, run_dir=run_dir, resume=resume,
              on_round=on_round)

    return app


__all__ = [
    "CHECKPOINT_FILE",
    "Coordinator",
    "apply_overrides",
    "make_server_app",
    "record_bytes",
    "resolved_config",
    "serve",
]
