"""The message protocol between the coordinator and the sites, in one place.

Every key a message carries, every conversion between Flower records and NumPy weights, and
the one way a site turns a coordinator's message into work: :meth:`SiteRequest.from_message`.

Requests (coordinator -> site), Flower message content:

- ``arrays`` (:data:`ARRAYS_KEY`): the global weights, one ``Array`` per tensor name.
- ``config`` (:data:`CONFIG_KEY`): ``fedmed-config`` (the run plan: the federation config
  as JSON without anything the site decides itself -- no paths, folders or data split,
  :data:`SITE_OWNED`), ``site-privacy`` (per-site DP overrides by site name),
  ``server-round``, ``total-rounds``, ``local-epochs``, ``proximal-mu`` (FedProx),
  ``strategy``, ``run-name``; under SecAgg+ also ``fedmed-keys`` (the weights' names in
  parameter order); the final personalisation round (a train message after the last
  round, ``server-round`` = ``total-rounds`` + 1, carrying the final global weights) also
  ``final-round`` (:data:`FINAL_ROUND_KEY`, ``True``).

Replies (site -> coordinator):

- ``arrays``: the site's weights (train), compressed per the config's ``compression``.
- ``metrics`` (:data:`METRICS_KEY`): ``num-examples`` (:data:`WEIGHT_KEY`: training or
  evaluation cases, the aggregation weight), ``train-loss``, ``seconds``, ``epsilon`` /
  ``delta`` (DP); evaluation: ``dice``, ``dice-<class>``, ``hd95``; the final round (no
  weights): ``test-cases``, ``final-dice`` / ``final-ci-low`` / ``final-ci-high`` (the
  global model on the site's own test cases: mean Dice and its bootstrap 95% interval) and
  the same with ``personal-`` (the site's personal model, when it has one), ``epsilon`` /
  ``delta`` (DP fine-tuning).
- ``fedmed`` (:data:`INFO_KEY`): ``site`` (its name), ``compression-*`` (how to
  decompress), ``skipped`` (why a site made no update), ``personal-skipped`` (final
  round: why there is no personal model), or ``refused`` (a
  :class:`~fedmed.policy.ReasonCode`) with ``reason`` (its fixed sentence).

Every request is checked against the site's policy in :meth:`SiteRequest.from_message`,
before any data is read; nothing but reason codes, counts and rounded aggregate metrics
goes back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmed.config import FederationConfig, config_from_dict
from fedmed.errors import ConfigError
from fedmed.federation.site import SiteSpec, site_for_node
from fedmed.policy import ReasonCode, refuse

# Records of a message's content.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INFO_KEY = "fedmed"

# Keys of the request's ConfigRecord.
CFG_KEY = "fedmed-config"
ROUND_KEY = "server-round"
TOTAL_ROUNDS_KEY = "total-rounds"
LOCAL_EPOCHS_KEY = "local-epochs"
MU_KEY = "proximal-mu"
STRATEGY_KEY = "strategy"
RUN_NAME_KEY = "run-name"
SITE_PRIVACY_KEY = "site-privacy"
KEYS_KEY = "fedmed-keys"
FINAL_ROUND_KEY = "final-round"

# Keys of the reply's records.
WEIGHT_KEY = "num-examples"
SITE_KEY = "site"
SKIPPED_KEY = "skipped"
REFUSED_KEY = "refused"
REASON_KEY = "reason"
COMPRESSION_PREFIX = "compression-"
PERSONAL_SKIPPED_KEY = "personal-skipped"
# The final round's metrics: f"{FINAL_PREFIX}{k}" / f"{PERSONAL_PREFIX}{k}" for INTERVAL_KEYS.
TEST_CASES_KEY = "test-cases"
FINAL_PREFIX = "final-"
PERSONAL_PREFIX = "personal-"
INTERVAL_KEYS = ("dice", "ci-low", "ci-high")



# -- records <-> NumPy ---------------------------------------------------------------------


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Weights as Flower's ``ArrayRecord`` (one ``Array`` per name, order kept)."""
    # np.require keeps a 0-d tensor 0-d (np.ascontiguousarray would make it 1-d)
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ``ArrayRecord`` as NumPy weights by name."""
    return {k: a.numpy() for k, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized payload bytes of an ArrayRecord (sum of its arrays' ``data``)."""
    return int(sum(len(a.data) for a in record.values()))


SITE_OWNED: dict[str, tuple[str, ...]] = {
    "": ("root", "sites", "central_test", "unseen_sites", "tracking"),
    "preprocessing": ("cache_dir", "max_case_megavoxels"),
    "training": ("val_fraction", "test_fraction", "device", "num_workers", "progress"),
    "federation": ("client_resources", "max_parallel_sites"),
}
"""Config keys only the site decides (section -> keys; ``""``: top level), and the
coordinator's own ``tracking`` (where it logs, possibly a server URI). The coordinator
never sends them; a request that carries one is refused (``site-owned-setting``)."""


def config_json(cfg: FederationConfig) -> str:
    """The run plan as it travels in a request: the config without :data:`SITE_OWNED`."""
    data = cfg.model_dump(mode="json")
    for section, keys in SITE_OWNED.items():
        target = data if not section else data[section]
        for key in keys:
            target.pop(key, None)
    return json.dumps(data)


def site_privacy_json(cfg: FederationConfig) -> str:
    """Per-site DP overrides by site name (:data:`SITE_PRIVACY_KEY`)."""
    return json.dumps({
        s.name: s.privacy.model_dump(mode="json", exclude_none=True)
        for s in cfg.sites if s.privacy is not None
    })


def request_config(
    cfg: FederationConfig, *, total_rounds: int, local_epochs: int, strategy: str,
    run_name: str,
) -> ConfigRecord:
    """The ConfigRecord of a round's requests (the strategy adds ``server-round`` etc.)."""
    return ConfigRecord({
        CFG_KEY: config_json(cfg),
        SITE_PRIVACY_KEY: site_privacy_json(cfg),
        TOTAL_ROUNDS_KEY: total_rounds,
        LOCAL_EPOCHS_KEY: local_epochs,
        STRATEGY_KEY: strategy,
        RUN_NAME_KEY: run_name,
    })


# -- the site's side ----------------------------------------------------------------------


def _site_owned_keys(plan: Mapping[str, Any]) -> list[str]:
    found = []
    for section, keys in SITE_OWNED.items():
        target = plan if not section else plan.get(section)
        if isinstance(target, Mapping):
            found += [f"{section}.{k}" if section else k for k in keys if k in target]
    return found


def config_for_site(
    plan_json: Any, spec: SiteSpec, site_privacy_json: Any = None
) -> FederationConfig:
    """The run plan completed with what only the site decides, validated.

    Raises:
        RequestRefused: ``site-owned-setting`` (the plan names a path, a folder or the
            data split) or ``invalid-request`` (not a valid plan).
    """
    try:
        plan = json.loads(str(plan_json))
        overrides = json.loads(str(site_privacy_json)) if site_privacy_json else {}
    except json.JSONDecodeError as exc:
        refuse(ReasonCode.INVALID_REQUEST, f"the run plan is not JSON: {exc}")
    if not isinstance(plan, dict) or not isinstance(overrides, dict):
        refuse(ReasonCode.INVALID_REQUEST, "the run plan is not a JSON object")
    owned = _site_owned_keys(plan)
    if owned:
        refuse(ReasonCode.SITE_OWNED_SETTING, f"the request sets {owned}")
    data = spec.policy.data
    site_entry: dict[str, Any] = {"name": spec.name, "path": str(spec.data_dir)}
    if overrides.get(spec.name):
        site_entry["privacy"] = overrides[spec.name]
    training = dict(plan.get("training") or {})
    training.update(val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                    progress=False)
    if spec.device is not None:
        training["device"] = spec.device
    preprocessing = dict(plan.get("preprocessing") or {})
    preprocessing["max_case_megavoxels"] = data.max_image_megavoxels
    if spec.cache_dir is not None:
        preprocessing["cache_dir"] = str(spec.cache_dir)
    full = {**plan, "sites": [site_entry], "training": training,
            "preprocessing": preprocessing}
    try:
        return config_from_dict(full, root=spec.data_dir)
    except ConfigError as exc:
        refuse(ReasonCode.INVALID_REQUEST, str(exc))
        raise  # unreachable: refuse raises


def _number(config: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = config.get(key, default)
    try:
        out = kind(value)
    except (TypeError, ValueError):
        refuse(ReasonCode.INVALID_REQUEST, f"{key} is {value!r}, not a number")
    if isinstance(out, float) and not math.isfinite(out):
        refuse(ReasonCode.INVALID_REQUEST, f"{key} is {value!r}")
    return out


@dataclass(frozen=True)
class SiteRequest:
    """A coordinator's train or evaluate request, checked against the site's policy.

    Attributes:
        cfg: the run plan the coordinator sent, completed with the site's own settings.
        spec: the site (folders, policy) as its node config or simulation places it.
        weights: the global weights.
        server_round: 1-based round.
        total_rounds: rounds planned (the learning-rate schedule's length).
        local_epochs: passes over the site's training cases this round.
        mu: FedProx's proximal coefficient (0: none).
        run_name: identifies the run (per-run ledger figures, per-run state).
        training: a train request (else evaluate).
        secure: it arrived through secure aggregation (SecAgg+).
        final: the final personalisation round (round ``total_rounds + 1``; the reply
            carries metrics only, so secure aggregation does not apply).
    """

    cfg: FederationConfig
    spec: SiteSpec
    weights: dict[str, np.ndarray]
    server_round: int
    total_rounds: int
    local_epochs: int
    mu: float
    run_name: str
    training: bool
    secure: bool
    final: bool = False

    @property
    def strategy(self) -> str:
        """The strategy's config name."""
        return self.cfg.federation.strategy

    @property
    def fedbn(self) -> bool:
        """Whether normalisation tensors stay at the site (FedBN)."""
        return self.strategy == "fedbn"

    @classmethod
    def from_message(
        cls,
        message: Message,
        context: Any,
        *,
        training: bool,
        sites: Sequence[SiteSpec] | None = None,
    ) -> SiteRequest:
        """The request a Flower train/evaluate message carries, if the site's policy allows it.

        Args:
            message: the coordinator's message (``arrays`` + ``config``).
            context: the ClientApp's context (node config: which site this is).
            training: a train message (else evaluate).
            sites: simulation: every site, picked by ``partition-id``; deployment: ``None``
                (the node config names the site).

        Raises:
            RequestRefused: the policy forbids it, the request is malformed, or the site is
                not configured (the reason code is what the coordinator gets).
        """
        spec = site_for_node(context.node_config, sites)
        content = message.content
        if ARRAYS_KEY not in content.array_records:
            refuse(ReasonCode.INVALID_REQUEST, "the message carries no weights")
        config = content.config_records.get(CONFIG_KEY, ConfigRecord())
        weights = from_record(content.array_records[ARRAYS_KEY])
        return cls.build(weights, config, spec, training=training, secure=False)

    @classmethod
    def build(
        cls,
        weights: dict[str, np.ndarray],
        config: Mapping[str, Any],
        spec: SiteSpec,
        *,
        training: bool,
        secure: bool,
    ) -> SiteRequest:
        """The request from weights and a request's config entries (also SecAgg+'s path).

        Raises:
            RequestRefused: see :meth:`from_message`.
        """
        if not config.get(CFG_KEY):
            refuse(ReasonCode.INVALID_REQUEST, f"the request has no {CFG_KEY!r}")
        cfg = config_for_site(config[CFG_KEY], spec, config.get(SITE_PRIVACY_KEY))
        fed = cfg.federation
        server_round = _number(config, ROUND_KEY, int, 1)
        total_rounds = _number(config, TOTAL_ROUNDS_KEY, int, fed.rounds)
        local_epochs = _number(config, LOCAL_EPOCHS_KEY, int, fed.local_epochs)
        mu = _number(config, MU_KEY, float, 0.0)
        strategy = str(config.get(STRATEGY_KEY, fed.strategy))
        if (strategy, total_rounds, local_epochs) != (fed.strategy, fed.rounds,
                                                      fed.local_epochs):
            refuse(ReasonCode.INVALID_REQUEST,
                   f"strategy/rounds/local epochs {strategy}/{total_rounds}/{local_epochs} "
                   f"contradict the plan's {fed.strategy}/{fed.rounds}/{fed.local_epochs}")
        final = config.get(FINAL_ROUND_KEY, False)
        if not isinstance(final, bool) or (final and not training):
            refuse(ReasonCode.INVALID_REQUEST, f"{FINAL_ROUND_KEY} {final!r} in a "
                   f"{'train' if training else 'evaluate'} request")
        first, last = (total_rounds + 1, total_rounds + 1) if final else (1, total_rounds)
        if not first <= server_round <= last or mu < 0:
            refuse(ReasonCode.INVALID_REQUEST, f"round {server_round} of {total_rounds}, mu {mu}"
                   f"{' (final round)' if final else ''}")
        # The final round trains only to fine-tune; its reply uploads no update.
        epochs = local_epochs
        if final and fed.personalization == "finetune":
            epochs = fed.personalization_epochs
        spec.policy.check_request(
            cfg, site=spec.name, training=training, secure=secure,
            total_rounds=total_rounds, local_epochs=epochs, upload=not final,
        )
        return cls(
            cfg=cfg, spec=spec, weights=weights, server_round=server_round,
            total_rounds=total_rounds, local_epochs=local_epochs, mu=mu,
            run_name=str(config.get(RUN_NAME_KEY, "run")), training=training, secure=secure,
            final=final,
        )


def reply(message: Message, metrics: Mapping[str, Any], info: Mapping[str, Any],
          arrays: Mapping[str, np.ndarray] | None = None) -> Message:
    """The site's reply: metrics, info and (train) the weights to send."""
    content = RecordDict({METRICS_KEY: MetricRecord(dict(metrics)),
                          INFO_KEY: ConfigRecord(dict(info))})
    if arrays is not None:
        content[ARRAYS_KEY] = to_record(arrays)
    return Message(content, reply_to=message)


def refusal(message: Message, site: str, code: str) -> Message:
    """The reply of a site that refuses: its name, the reason code and its fixed sentence."""
    sentence = ReasonCode(code).sentence if code in _CODES else ReasonCode.SITE_ERROR.sentence
    return reply(message, {}, {SITE_KEY: site, REFUSED_KEY: code, REASON_KEY: sentence})


_CODES = frozenset(c.value for c in ReasonCode)


# -- the coordinator's side ----------------------------------------------------------------


def reply_parts(msg: Message) -> tuple[str, MetricRecord, ConfigRecord]:
    """``(site name, metrics, info)`` of a reply without error (site: node id if unnamed)."""
    content = msg.content
    info = content.config_records.get(INFO_KEY, ConfigRecord())
    metrics = content.metric_records.get(METRICS_KEY, MetricRecord())
    return str(info.get(SITE_KEY, msg.metadata.src_node_id)), metrics, info


def compression_meta(info: Mapping[str, Any]) -> dict[str, Any]:
    """The ``compression-*`` entries of a reply's info, without the prefix."""
    return {
        k.removeprefix(COMPRESSION_PREFIX): v for k, v in info.items()
        if k.startswith(COMPRESSION_PREFIX)
    }


__all__ = [
    "ARRAYS_KEY",
    "CFG_KEY",
    "CONFIG_KEY",
    "FINAL_PREFIX",
    "FINAL_ROUND_KEY",
    "INFO_KEY",
    "INTERVAL_KEYS",
    "METRICS_KEY",
    "PERSONAL_PREFIX",
    "PERSONAL_SKIPPED_KEY",
    "TEST_CASES_KEY",
    "WEIGHT_KEY",
    "SiteRequest",
    "compression_meta",
    "config_for_site",
    "config_json",
    "from_record",
    "record_bytes",
    "refusal",
    "reply",
    "reply_parts",
    "request_config",
    "to_record",
]
