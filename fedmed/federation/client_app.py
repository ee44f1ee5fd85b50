"""The fedmed ``ClientApp``: Flower messages in, the site's work, Flower messages out.

:func:`handle_train` / :func:`handle_evaluate` turn a message into a
:class:`~fedmed.federation.protocol.SiteRequest` (checked against the site's policy before
any data is read), call the pure :func:`~fedmed.federation.site.train_site` /
:func:`~fedmed.federation.site.evaluate_site`, and build the reply; a SecAgg+ stage goes to
:mod:`fedmed.federation.secagg_client`. :func:`make_client_app` wires them into the
``ClientApp`` that ``client/app.py`` exposes.

What leaves the site: weights, the number of cases, metrics over at least the policy's k
cases rounded as it says, ε/δ under DP -- or a refusal's reason code. Handlers catch every
exception: the details (file names, values, case ids) go to the site's own log, never into
the reply.

FedBN's normalisation tensors are kept in ``context.state`` within a process and in the
site's state folder across restarts (:mod:`fedmed.federation.site_state`); Ditto's personal
model only in the state folder. A train message flagged ``final-round`` is the final
personalisation round (:func:`fedmed.federation.personal.final_round`): its reply carries
metrics only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedmed.errors import RequestRefused
from fedmed.federation import compression
from fedmed.federation.personal import final_round, train_personal
from fedmed.federation.protocol import (
    COMPRESSION_PREFIX,
    FINAL_PREFIX,
    INTERVAL_KEYS,
    PERSONAL_PREFIX,
    PERSONAL_SKIPPED_KEY,
    SITE_KEY,
    SKIPPED_KEY,
    TEST_CASES_KEY,
    WEIGHT_KEY,
    SiteRequest,
    refusal,
    reply,
)
from fedmed.federation.site import SiteSpec, evaluate_site, site_for_node, train_site
from fedmed.federation.site_state import (
    is_last_global,
    load_site_norm,
    remember_global,
    run_state_dir,
    save_site_norm,
    weights_digest,
)
from fedmed.policy import ReasonCode, refuse

log = logging.getLogger(__name__)

_NORM_STATE = "fedbn-norm"
_NORM_META = "fedbn-meta"

Handler = Callable[[Message, Any, "Sequence[SiteSpec] | None"], Message]


def _norm_from_state(state: Any, run_name: str, before_round: int) -> dict[str, np.ndarray] | None:
    """FedBN tensors kept in ``context.state`` by this run from a round before ``before_round``."""
    meta = state.get(_NORM_META) if _NORM_META in state else None
    arrays = state.get(_NORM_STATE) if _NORM_STATE in state else None
    if isinstance(meta, ConfigRecord) and isinstance(arrays, ArrayRecord):
        kept = meta.get("round", 0)
        if meta.get("run") == run_name and isinstance(kept, int) and kept < before_round:
            return {k: a.numpy() for k, a in arrays.items()}
    return None


def _own_norm(context: Any, req: SiteRequest, before_round: int) -> dict[str, np.ndarray] | None:
    norm = _norm_from_state(context.state, req.run_name, before_round)
    if norm is None:
        norm = load_site_norm(run_state_dir(req.spec.state_dir, req.run_name), before_round)
    return norm


def _keep_norm(context: Any, req: SiteRequest, norm: dict[str, np.ndarray]) -> None:
    context.state[_NORM_STATE] = ArrayRecord({k: Array(np.asarray(v)) for k, v in norm.items()})
    context.state[_NORM_META] = ConfigRecord({"round": req.server_round, "run": req.run_name})
    save_site_norm(run_state_dir(req.spec.state_dir, req.run_name), req.server_round, norm)


def _train(message: Message, context: Any, sites: Sequence[SiteSpec] | None) -> Message:
    req = SiteRequest.from_message(message, context, training=True, sites=sites)
    if req.final:
        return _final(message, context, req)
    spec, policy = req.spec, req.spec.policy
    own = _own_norm(context, req, req.server_round) if req.fedbn else None
    result, norm = train_site(
        req.cfg, spec, req.weights, server_round=req.server_round,
        total_rounds=req.total_rounds, local_epochs=req.local_epochs, mu=req.mu,
        own_norm=own, fedbn=req.fedbn, run_name=req.run_name,
    )
    if not result.skipped and req.cfg.federation.personalization == "ditto":
        train_personal(
            req.cfg, spec, req.weights, server_round=req.server_round,
            total_rounds=req.total_rounds, local_epochs=req.local_epochs,
            run_name=req.run_name, own_norm=own,
        )
    remember_global(spec.state_dir, req.run_name, req.server_round, weights_digest(req.weights))
    info: dict[str, Any] = {SITE_KEY: spec.name}
    metrics: dict[str, Any] = {WEIGHT_KEY: int(result.num_cases),
                               "seconds": round(float(result.seconds), 1)}
    if policy.may_report_loss(req.cfg.privacy_for(spec.name).enabled, result.num_cases):
        metrics["train-loss"] = policy.round_metric(result.loss)
    if result.epsilon is not None:
        metrics["epsilon"] = float(result.epsilon)
    if result.delta is not None:
        metrics["delta"] = float(result.delta)
    if result.skipped:
        info[SKIPPED_KEY] = result.skipped
        log.warning("site %s: no update this round: %s", spec.name, result.skipped)
        return reply(message, metrics, info)
    if norm is not None:
        _keep_norm(context, req, norm)
    comp = req.cfg.compression
    payload, meta = compression.compress(result.weights, req.weights, comp.kind, comp.deltas)
    info.update({f"{COMPRESSION_PREFIX}{k}": v for k, v in meta.items()})
    return reply(message, metrics, info, arrays=payload)


def _final(message: Message, context: Any, req: SiteRequest) -> Message:
    """The final round: personalise, score on the site's own test cases, reply metrics only."""
    spec = req.spec
    own = _own_norm(context, req, req.server_round) if req.fedbn else None
    result = final_round(
        req.cfg, spec, req.weights, total_rounds=req.total_rounds,
        local_epochs=req.local_epochs, run_name=req.run_name, own_norm=own,
    )
    # The final weights arrived with a train request: evaluating them later is legitimate.
    remember_global(spec.state_dir, req.run_name, req.server_round, weights_digest(req.weights))
    metrics: dict[str, Any] = {TEST_CASES_KEY: int(result.test_cases)}
    for prefix, scored in ((FINAL_PREFIX, result.global_model),
                           (PERSONAL_PREFIX, result.personal)):
        if scored is not None:
            values = (scored.dice, scored.ci_low, scored.ci_high)
            metrics.update({f"{prefix}{k}": float(v) for k, v in zip(INTERVAL_KEYS, values,
                                                                      strict=True)})
    if result.epsilon is not None:
        metrics["epsilon"] = float(result.epsilon)
    if result.delta is not None:
        metrics["delta"] = float(result.delta)
    info: dict[str, Any] = {SITE_KEY: spec.name}
    if result.personal_skipped:
        info[PERSONAL_SKIPPED_KEY] = result.personal_skipped
    return reply(message, metrics, info)


def _evaluate(message: Message, context: Any, sites: Sequence[SiteSpec] | None) -> Message:
    req = SiteRequest.from_message(message, context, training=False, sites=sites)
    spec, policy = req.spec, req.spec.policy
    if not is_last_global(spec.state_dir, req.run_name, weights_digest(req.weights)):
        refuse(ReasonCode.WEIGHTS_NOT_GLOBAL,
               f"run {req.run_name!r}: the weights to evaluate are not the last global "
               "weights this site received for training")
    own = _own_norm(context, req, req.server_round + 1) if req.fedbn else None
    result, n = evaluate_site(req.cfg, spec, req.weights, own_norm=own, run_name=req.run_name)
    # MetricRecord values must be numbers; NaN (a class absent everywhere) stays NaN.
    metrics: dict[str, Any] = {WEIGHT_KEY: int(n), "dice": policy.round_metric(result.dice_mean),
                               "hd95": policy.round_metric(result.hd95_mean)}
    for cls, value in result.dice_per_class.items():
        metrics[f"dice-{cls}"] = policy.round_metric(value)
    return reply(message, metrics, {SITE_KEY: spec.name})


def guarded(handler: Handler, message: Message, context: Any,
            sites: Sequence[SiteSpec] | None) -> Message:
    """Run ``handler``; any refusal or failure becomes a reply with a reason code only.

    What went wrong in detail (which file, which value) is logged here, at the site.
    """
    name = "(unconfigured site)"
    try:
        return handler(message, context, sites)
    except RequestRefused as exc:
        log.warning("refused a %s request: %s", message.metadata.message_type, exc)
        code = exc.code
    except Exception:  # noqa: BLE001 - nothing of an exception may reach the coordinator
        log.exception("site failed on a %s request", message.metadata.message_type)
        code = ReasonCode.SITE_ERROR.value
    try:
        name = site_for_node(context.node_config, sites).name
    except Exception:  # noqa: BLE001 - an unconfigured site still answers
        pass
    return refusal(message, name, code)


def handle_train(message: Message, context: Any, *, sites: Sequence[SiteSpec] | None = None
                 ) -> Message:
    """Flower train handler: global weights in, trained (compressed) weights + metrics out.

    Reply: ``arrays`` (compressed per ``cfg.compression``), ``metrics`` (``num-examples`` =
    training cases, ``train-loss`` when the policy allows, ``epsilon``/``delta`` for DP) and
    ``fedmed`` (``site``, compression metadata, ``skipped`` reason); or a refusal. Under
    Ditto the site also trains its personal model. The final round (``final-round``)
    replies with metrics only (see :mod:`fedmed.federation.protocol`).
    """
    return guarded(_train, message, context, sites)


def handle_evaluate(message: Message, context: Any, *, sites: Sequence[SiteSpec] | None = None
                    ) -> Message:
    """Flower evaluate handler: Dice of the last global model on the site's validation cases.

    Reply metrics (rounded per policy, over at least k cases): ``num-examples``, ``dice``
    (mean over foreground classes), ``dice-<class>``, ``hd95``; or a refusal.
    """
    return guarded(_evaluate, message, context, sites)


def make_client_app(*, sites: Sequence[SiteSpec] | None = None) -> Any:
    """The fedmed ``ClientApp``.

    Args:
        sites: simulation: every site (``partition-id`` picks one), from the researcher's
            config; deployment (``client/app.py``): ``None``, the SuperNode's node config
            names the site.
    """
    from flwr.clientapp import ClientApp

    from fedmed.federation import secagg_client

    app = ClientApp()

    @app.train()
    def _train_entry(message: Message, context: Any) -> Message:
        if secagg_client.is_secagg_message(message):  # a SecAgg+ stage
            return secagg_client.handle_secagg_train(message, context, sites=sites)
        return handle_train(message, context, sites=sites)

    @app.evaluate()
    def _evaluate_entry(message: Message, context: Any) -> Message:
        return handle_evaluate(message, context, sites=sites)

    return app


__all__ = ["guarded", "handle_evaluate", "handle_train", "make_client_app"]
