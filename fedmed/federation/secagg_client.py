"""The site's side of secure aggregation (Flower SecAgg+).

Flower 1.42 implements SecAgg+ only on its legacy path: on the site, ``secaggplus_mod``
around a legacy ``Client``. :func:`handle_secagg_train` runs that mod around
:class:`SecAggSiteClient`, a ``NumPyClient`` whose ``fit`` turns the legacy call into the
same :class:`~fedmed.federation.protocol.SiteRequest` as the plain handler and calls the
same :func:`~fedmed.federation.site.train_site` (patient-level DP included: it happens
inside the trainer; SecAgg+ only hides its result). :func:`is_secagg_message` tells the
ClientApp which path a message belongs to, so one ClientApp serves both modes.

The site's policy applies here as on the plain path, plus one check only this path can make:
at the masked-vector stage the site counts the sites actually in the sum (its surviving
SecAgg+ neighbours and itself) and refuses to contribute to a sum of fewer than
``secure_aggregation.min_participants``. A refusal raises an exception whose text is only
the reason code: Flower sends that text to the coordinator as the error.

The coordinator's side is :mod:`fedmed.federation.secagg_coordinator`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message

from fedmed.errors import RequestRefused
from fedmed.federation.personal import train_personal
from fedmed.federation.protocol import KEYS_KEY, SITE_KEY, SiteRequest
from fedmed.federation.site import SiteSpec, site_for_node, train_site
from fedmed.federation.site_state import remember_global, weights_digest
from fedmed.policy import ReasonCode, refuse

log = logging.getLogger(__name__)


class SiteRefusal(RuntimeError):
    """Raised to make Flower drop this site from a SecAgg+ round; its text is the code only."""


def is_secagg_message(message: Message) -> bool:
    """Whether a train message belongs to the SecAgg+ protocol (any of its four stages)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in message.content.config_records


class SecAggSiteClient:
    """The legacy ``NumPyClient`` a site runs under SecAgg+; trains with ``train_site``.

    Args:
        spec: the site.
    """

    def __init__(self, spec: SiteSpec) -> None:
        self.spec = spec

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train on the global weights (given in the coordinator's key order).

        Under Ditto the site also trains its personal model (it stays at the site).

        Raises:
            RequestRefused: the names do not match the arrays, the policy forbids it, or a
                final round arrives this way (it uploads nothing, so it has no place in a
                secure sum).
            SiteRefusal: the site made no update (e.g. its privacy budget is spent): under
                SecAgg+ it then counts as dropped out, and the other sites' masks are still
                removed.
        """
        keys = json.loads(str(config.get(KEYS_KEY, "[]")))
        if not isinstance(keys, list) or len(keys) != len(parameters):
            refuse(ReasonCode.INVALID_REQUEST,
                   f"{len(parameters)} arrays for the names {str(keys)[:80]}")
        weights = {str(k): np.asarray(p) for k, p in zip(keys, parameters, strict=True)}
        req = SiteRequest.build(weights, config, self.spec, training=True, secure=True)
        if req.final:
            refuse(ReasonCode.INVALID_REQUEST, "a final round through secure aggregation")
        result, _ = train_site(
            req.cfg, req.spec, req.weights, server_round=req.server_round,
            total_rounds=req.total_rounds, local_epochs=req.local_epochs, mu=req.mu,
            run_name=req.run_name,
        )
        if not result.skipped and req.cfg.federation.personalization == "ditto":
            train_personal(
                req.cfg, req.spec, req.weights, server_round=req.server_round,
                total_rounds=req.total_rounds, local_epochs=req.local_epochs,
                run_name=req.run_name,
            )
        remember_global(self.spec.state_dir, req.run_name, req.server_round,
                        weights_digest(req.weights))
        if result.skipped:
            log.warning("site %s: no update this round: %s", self.spec.name, result.skipped)
            raise SiteRefusal(ReasonCode.EPSILON_CAP_REACHED.value)
        policy = self.spec.policy
        metrics: dict[str, Any] = {
            SITE_KEY: self.spec.name, "seconds": round(float(result.seconds), 1),
        }
        if policy.may_report_loss(req.cfg.privacy_for(self.spec.name).enabled,
                                  result.num_cases):
            metrics["train-loss"] = policy.round_metric(result.loss)
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


def _check_participants(message: Message, spec: SiteSpec) -> None:
    """Refuse the masked-vector stage when fewer sites than the policy asks are in the sum."""
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    configs = message.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
        return
    ciphertexts = configs.get(Key.CIPHERTEXT_LIST, [])
    present = (len(ciphertexts) if isinstance(ciphertexts, list) else 0) + 1  # with itself
    wanted = spec.policy.secure_aggregation.min_participants
    if present < wanted:
        refuse(ReasonCode.TOO_FEW_SECAGG_PARTICIPANTS,
               f"{present} sites in the secure sum < {wanted}")


def handle_secagg_train(
    message: Message, context: Any, *, sites: Sequence[SiteSpec] | None = None
) -> Any:
    """Flower train handler for SecAgg+ messages: ``secaggplus_mod`` around the site client.

    The mod keeps the protocol state in ``context.state`` and, at the masked-vector stage,
    calls the client's ``fit`` and replaces its parameters with the masked, quantised
    vector; the unmasked update never leaves the site.

    Raises:
        SiteRefusal: the site refuses or fails; the exception's text is the reason code
            (the details are logged here).
    """
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
    from flwr.client.mod import secaggplus_mod

    try:
        spec = site_for_node(context.node_config, sites)
        _check_participants(message, spec)

        def call_next(msg: Any, ctx: Any) -> Any:
            return handle_legacy_message_from_msgtype(
                lambda c: SecAggSiteClient(spec).to_client(), msg, ctx
            )

        return secaggplus_mod(message, context, call_next)
    except SiteRefusal:
        raise
    except RequestRefused as exc:
        log.warning("refused a secure-aggregation request: %s", exc)
        raise SiteRefusal(exc.code) from None
    except Exception:  # noqa: BLE001 - nothing of an exception may reach the coordinator
        log.exception("site failed in a secure-aggregation stage")
        raise SiteRefusal(ReasonCode.SITE_ERROR.value) from None


__all__ = ["SecAggSiteClient", "SiteRefusal", "handle_secagg_train", "is_secagg_message"]
