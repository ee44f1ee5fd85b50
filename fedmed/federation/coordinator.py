"""The coordinator's round loop: train, aggregate, evaluate, record, checkpoint.

:class:`Coordinator` drives a Flower strategy round by round through its message API
(``configure_train`` -> ``Grid.send_and_receive`` -> ``aggregate_train`` ->
``configure_evaluate`` -> ... ), exactly the steps of ``Strategy.start``, written out so that
after every round it can

- clean the sites' replies before aggregation (:mod:`fedmed.federation.replies`);
- evaluate the global model on the coordinator's held-out test set;
- append one line to ``metrics.jsonl`` (``round``, ``central_dice``,
  ``central_dice_per_class``, ``per_site_dice`` (of the model the round started from),
  ``train_loss``, ``wall_seconds``, ``bytes_sent``, ``bytes_received``, ``sites_trained``,
  ``sites_refused`` (reason codes), ``sites_rejected``, ``epsilon``, ...), and send it to
  TensorBoard / MLflow (``tracking``, :mod:`fedmed.export.tracking`);
- write ``checkpoint.pt`` (:mod:`fedmed.federation.round_checkpoint`), from which
  ``--resume`` continues after a restart.

With ``federation.personalization`` a final round follows the last one
(:meth:`Coordinator.final_stage`): every site scores the final global model and its own
personal model on its own test cases (``per_site_final`` in ``summary.json``).

At the end it writes ``model.pt`` and ``summary.json``. A round is two stages,
:meth:`Coordinator.train_stage` and :meth:`Coordinator.evaluate_stage`; the SecAgg+
coordinator (:mod:`fedmed.federation.secagg_coordinator`) replaces only the first.
The ServerApp around it is :mod:`fedmed.federation.server_app`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedmed.config import FederationConfig
from fedmed.errors import FedMedError
from fedmed.export.tracking import RunTracker, open_tracker
from fedmed.federation.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FINAL_ROUND_KEY,
    ROUND_KEY,
    from_record,
    record_bytes,
    request_config,
    to_record,
)
from fedmed.federation.replies import (
    clean_train_replies,
    finite,
    read_evaluate_replies,
    read_final_replies,
)
from fedmed.federation.round_checkpoint import (
    CHECKPOINT_FILE,
    RoundState,
    load_round_state,
    save_round_state,
)
from fedmed.federation.rundir import RunDir
from fedmed.federation.strategies import (
    build_strategy,
    restore_strategy_state,
    strategy_state,
)

log = logging.getLogger(__name__)

RoundCallback = Callable[[Mapping[str, Any]], None]


def resolved_config(cfg: FederationConfig) -> tuple[FederationConfig, tuple[float, float, float]]:
    """``cfg`` with the target spacing fixed (planned from fingerprints when unset).

    The coordinator sends this config to every site, so all of them preprocess alike even
    when they cannot see each other's fingerprints.
    """
    from fedmed.data.planning import plan_preprocessing

    spacing = plan_preprocessing(cfg).target_spacing
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
        run_name: identifies the run to the sites (per-run ledger figures and state);
            default: the run directory's ``run-id``.
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
        self.run_name = run_name or run.run_id
        self.strategy_name = self.cfg.federation.strategy
        self.rounds = self.cfg.federation.rounds
        seed_everything(self.cfg.training.seed)
        model = build_model(self.cfg.model, self.cfg.modalities, self.cfg.num_classes)
        self.norm_keys = sorted(norm_parameter_names(model))
        self.trainer = LocalTrainer(self.cfg, model, site=None)
        self.strategy = build_strategy(self.cfg, norm_keys=self.norm_keys)
        self._central_cases: list[Any] | None = None
        self._model_json = json.dumps(self.cfg.model.model_dump(mode="json"))
        self.tracker = RunTracker()  # opened in run_rounds (TensorBoard / MLflow)

    @property
    def checkpoint_path(self) -> Path:
        """``RUN/checkpoint.pt``."""
        return self.run.path / CHECKPOINT_FILE

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
        from fedmed.training.evaluation import evaluate_everywhere

        self._set_global(arrays)
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

    def request_config(self) -> ConfigRecord:
        """The ConfigRecord every request of this run carries (the strategy adds the round)."""
        return request_config(
            self.cfg, total_rounds=self.rounds,
            local_epochs=self.cfg.federation.local_epochs, strategy=self.strategy_name,
            run_name=self.run_name,
        )

    def train_stage(
        self, grid: Any, server_round: int, arrays: dict[str, np.ndarray], line: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Send the global weights, aggregate what comes back; returns the new weights.

        Adds ``bytes_sent``, ``train_loss`` and what :func:`clean_train_replies` records.
        """
        record = to_record(arrays)
        messages = list(
            self.strategy.configure_train(server_round, record, self.request_config(), grid)
        )
        line["bytes_sent"] = sum(record_bytes(m.content.array_records[ARRAYS_KEY])
                                 for m in messages)
        replies = grid.send_and_receive(
            messages, timeout=self.cfg.federation.round_timeout_s
        ) if messages else []
        expected = set(arrays) - set(self.norm_keys) if self.strategy_name == "fedbn" else None
        cleaned = clean_train_replies(replies, arrays, line, expected)
        new_arrays = arrays
        if cleaned:
            agg, agg_metrics = self.strategy.aggregate_train(server_round, cleaned)
            if agg is not None:
                new_arrays = from_record(agg)
            if agg_metrics is not None:
                line["train_loss"] = finite(agg_metrics.get("train-loss"))
        else:
            log.warning("round %d: no site sent an update; the global model is unchanged",
                        server_round)
        line.setdefault("train_loss", None)
        return new_arrays

    def evaluate_stage(
        self,
        grid: Any,
        server_round: int,
        sent: dict[str, np.ndarray],
        new: dict[str, np.ndarray],
        line: dict[str, Any],
    ) -> None:
        """Federated evaluation of ``sent``, central evaluation of ``new``, into ``line``.

        The sites evaluate the global weights they received for training this round (a site
        evaluates nothing else: a coordinator must not probe patients with weights of its
        choosing), so ``per_site_dice`` of round ``r`` is the model that round ``r`` started
        from; ``central_dice`` is the model after it.
        """
        if self.cfg.federation.evaluate_sites:
            record = to_record(sent)
            messages = list(self.strategy.configure_evaluate(
                server_round, record, self.request_config(), grid
            ))
            line["bytes_sent"] = line.get("bytes_sent", 0) + sum(
                record_bytes(m.content.array_records[ARRAYS_KEY]) for m in messages
            )
            replies = grid.send_and_receive(
                messages, timeout=self.cfg.federation.round_timeout_s
            ) if messages else []
            read_evaluate_replies(replies, line)
        else:
            line["per_site_dice"] = {}
        central = self.central_evaluate(new)
        line["central_dice"] = None if central is None else central["dice_mean"]
        line["central_dice_per_class"] = {} if central is None else central["dice_per_class"]
        line["central_hd95"] = None if central is None else central["hd95_mean"]

    def run_round(
        self, grid: Any, server_round: int, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Train, aggregate, evaluate one round; returns the new global weights and its line."""
        line: dict[str, Any] = {"round": server_round}
        # Seeded per round so that node sampling (fraction_train < 1) repeats on resume.
        random.seed(self.cfg.training.seed * 100_003 + server_round)
        new_arrays = self.train_stage(grid, server_round, arrays, line)
        self.evaluate_stage(grid, server_round, arrays, new_arrays, line)
        return new_arrays, line

    def final_stage(self, grid: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The personalisation round: each site scores the final global model and its own.

        Every connected site gets one more train message (round ``rounds + 1``,
        ``final-round`` set) with the final global weights; it personalises (fine-tunes, or
        takes its Ditto model) and replies with the mean Dice and bootstrap interval of both
        models on its own test cases -- metrics only, so the message goes over the Message
        API also under secure aggregation. Nothing is sent with ``personalization: none``.
        A site asked again (``--resume`` of a finished run) answers from what it kept.

        Returns:
            :func:`~fedmed.federation.replies.read_final_replies`' fields, or ``{}``.
        """
        if self.cfg.federation.personalization == "none":
            return {}
        config = self.request_config()
        config[ROUND_KEY] = self.rounds + 1
        config[FINAL_ROUND_KEY] = True
        content = RecordDict({ARRAYS_KEY: to_record(arrays), CONFIG_KEY: config})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                    for node in grid.get_node_ids()]
        replies = grid.send_and_receive(
            messages, timeout=self.cfg.federation.round_timeout_s
        ) if messages else []
        final = read_final_replies(replies)
        log.info("final round: %d site(s) scored their own test cases",
                 len(final["per_site_final"]))
        return final

    # -- the whole run -----------------------------------------------------------------------

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The initial global weights (the seeded model's)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.trainer.get_weights().items()}

    def _start(self) -> RoundState:
        """Where the run starts: the checkpoint's state on ``resume``, else round 0."""
        saved = load_round_state(
            self.checkpoint_path, strategy=self.strategy_name, model_json=self._model_json
        ) if self.resume else None
        if saved is not None:
            restore_strategy_state(self.strategy, saved.strategy_state)
            log.info("resuming %s after round %d", self.run.path, saved.round)
            return saved
        self.checkpoint_path.unlink(missing_ok=True)
        return RoundState(0, self.initial_arrays(), {}, [], 0.0)

    def run_rounds(self, grid: Any) -> dict[str, Any]:
        """All rounds (from the checkpoint on ``resume``), then ``model.pt`` + ``summary.json``.

        Returns:
            The summary written to ``summary.json``.
        """
        state = self._start()
        self.tracker = open_tracker(self.cfg, self.run.path, mode="federated",
                                    start_step=state.round + 1)
        arrays, history = state.arrays, state.history
        # metrics.jsonl holds exactly the finished rounds (a crash may have left a line of an
        # unfinished one behind).
        self.run.metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        started = time.perf_counter()
        for server_round in range(state.round + 1, self.rounds + 1):
            t0 = time.perf_counter()
            arrays, line = self.run_round(grid, server_round, arrays)
            line["round_seconds"] = time.perf_counter() - t0
            line["wall_seconds"] = state.wall_seconds + time.perf_counter() - started
            self.run.append_metrics(line)
            history.append(json.loads(self.run.metrics_path.read_text().splitlines()[-1]))
            self.tracker.log_line(history[-1], step=server_round)
            save_round_state(
                self.checkpoint_path,
                RoundState(server_round, arrays, strategy_state(self.strategy), history,
                           line["wall_seconds"]),
                strategy=self.strategy_name, model_json=self._model_json,
            )
            if self.on_round is not None:
                self.on_round(line)
            else:
                log.info("round %d/%d: central Dice %s, loss %s, %.1f s", server_round,
                         self.rounds, line["central_dice"], line["train_loss"],
                         line["round_seconds"])
        final = self.final_stage(grid, arrays)
        wall = state.wall_seconds + time.perf_counter() - started
        return self.finish(arrays, history, wall, final=final)

    def finish(
        self, arrays: Mapping[str, np.ndarray], history: list[dict[str, Any]], wall: float,
        *, final: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``model.pt`` and ``summary.json``; returns the summary.

        ``final``: what :meth:`final_stage` returned (``per_site_final`` etc.).
        """
        from fedmed.training.checkpoint import save_model

        final = dict(final or {})
        weights = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
        save_model(
            self.run.model_path, weights, self.cfg, self.target_spacing,
            mode="federated", strategy=self.strategy_name, rounds=self.rounds,
        )
        ev = self.final_evaluation(arrays)
        epsilon: dict[str, float] = {}
        refused: dict[str, dict[str, int]] = {}
        for h in history:
            epsilon.update(h.get("epsilon") or {})
            for key in ("sites_refused", "sites_refused_evaluation"):
                for site, code in (h.get(key) or {}).items():
                    counts = refused.setdefault(site, {})
                    counts[code] = counts.get(code, 0) + 1
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
            "personalization": self.cfg.federation.personalization,
            "per_site_final": final.get("per_site_final", {}),
        }
        for key in ("sites_refused_final", "sites_failed_final", "personalisation_skipped"):
            if final.get(key):
                summary[key] = final[key]
        epsilon.update(final.get("epsilon") or {})  # after fine-tuning, under DP
        if epsilon:
            summary["epsilon"] = epsilon
        if refused:
            summary["sites_refused"] = refused  # site -> reason code -> requests refused
        written = self.run.write_summary(summary)
        self.tracker.finish(written, step=self.rounds)
        return written


__all__ = ["Coordinator", "RoundCallback", "resolved_config"]
