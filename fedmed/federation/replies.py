"""The coordinator's reading of the sites' replies: what the strategy may aggregate.

:func:`clean_train_replies` decompresses the sites' updates, sets refused, skipped, failed
and rejected sites aside, and orders what is left by site name (bit-reproducible sums);
what it saw goes into the round's metrics line. An update is rejected (``sites_rejected``)
when it does not fit the global model (names, shapes), holds non-finite or absurdly large
values, or comes with an absurd number of cases: a broken or hostile site must not poison
the aggregate. :func:`read_evaluate_replies` turns the sites' evaluation replies into
per-site Dice and the case-weighted federated Dice; :func:`read_final_replies` the final
personalisation round's into ``summary.json``'s ``per_site_final``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from fedmed.errors import FederationError
from fedmed.federation import compression
from fedmed.federation.protocol import (
    ARRAYS_KEY,
    FINAL_PREFIX,
    INTERVAL_KEYS,
    METRICS_KEY,
    PERSONAL_PREFIX,
    PERSONAL_SKIPPED_KEY,
    REFUSED_KEY,
    SKIPPED_KEY,
    TEST_CASES_KEY,
    WEIGHT_KEY,
    compression_meta,
    from_record,
    record_bytes,
    reply_parts,
    to_record,
)
from fedmed.policy import ReasonCode

ERROR_TAIL = 200
"""Characters of a failed reply's error kept in ``metrics.jsonl``."""
MAX_ABS_WEIGHT = 1e4
"""Largest magnitude a weight may have in an accepted update (trained weights are O(1))."""
MAX_CASES = 10_000_000
"""Largest number of cases a site may report."""
_CODES = tuple(sorted((c.value for c in ReasonCode), key=len, reverse=True))


def reason_code_in(text: str) -> str | None:
    """The reason code a failed reply's error text carries (SecAgg+ refusals), if any."""
    return next((c for c in _CODES if c in text), None)


def update_problem(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    num_cases: int,
    expected: Collection[str] | None = None,
) -> str | None:
    """Why an update cannot be aggregated, or ``None`` when it can.

    Args:
        weights: the decompressed update.
        reference: the round's global weights.
        num_cases: the training cases the site reported.
        expected: the tensor names an update must have (FedBN: without the normalisation
            tensors); default: the reference's.
    """
    if not 0 < num_cases <= MAX_CASES:
        return f"reported {num_cases} training cases"
    if set(weights) != set(reference if expected is None else expected):
        return "its tensors do not match the global model's"
    for name, value in weights.items():
        arr = np.asarray(value)
        if arr.shape != np.shape(reference[name]):
            return f"tensor {name!r} has shape {arr.shape}, expected {np.shape(reference[name])}"
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                return f"tensor {name!r} holds non-finite values"
            if arr.size and float(np.max(np.abs(arr))) > MAX_ABS_WEIGHT:
                return f"tensor {name!r} holds values beyond +-{MAX_ABS_WEIGHT:g}"
    return None


def as_int(value: Any) -> int:
    """``value`` as an int when it is a number, else 0."""
    return int(value) if isinstance(value, int | float) else 0


def as_float(value: Any) -> float:
    """``value`` as a float when it is a number, else NaN."""
    return float(value) if isinstance(value, int | float) else math.nan


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def clean_train_replies(
    replies: Iterable[Message],
    reference: Mapping[str, np.ndarray],
    line: dict[str, Any],
    expected: Collection[str] | None = None,
) -> list[Message]:
    """Decompressed replies with only what the strategy aggregates, ordered by site.

    Args:
        replies: the sites' train replies.
        reference: the round's global weights (compressed deltas are relative to them).
        line: the round's metrics line; gets ``bytes_received``, ``sites_trained``,
            ``num_examples`` and, when there were any, ``sites_failed``,
            ``sites_refused`` (reason codes), ``sites_skipped``, ``sites_rejected``,
            ``epsilon``.
        expected: the tensor names an update must have (see :func:`update_problem`).
    """
    kept: list[tuple[str, Message]] = []
    out: dict[str, dict[str, Any]] = {k: {} for k in _SET_ASIDE}
    num: dict[str, int] = {}
    received = 0
    for msg in replies:
        if _set_aside(msg, out):
            continue
        site, metrics, info = reply_parts(msg)
        record = msg.content.array_records[ARRAYS_KEY]
        received += record_bytes(record)
        try:
            weights = compression.decompress(from_record(record), compression_meta(info), reference)
        except FederationError as exc:
            out["sites_rejected"][site] = f"cannot decompress its update: {exc}"
            continue
        n = as_int(metrics.get(WEIGHT_KEY, 0))
        problem = update_problem(weights, reference, n, expected)
        if problem is not None:
            out["sites_rejected"][site] = problem
            continue
        num[site] = n
        # The strategy sees exactly one ArrayRecord and one MetricRecord with the same keys
        # at every site (Flower's consistency check), whatever else sites report.
        msg.content = RecordDict({
            ARRAYS_KEY: to_record(weights),
            METRICS_KEY: MetricRecord(
                {WEIGHT_KEY: n, "train-loss": as_float(metrics.get("train-loss", math.nan))}
            ),
        })
        kept.append((site, msg))
    kept.sort(key=lambda t: t[0])
    line.update({
        "bytes_received": received,
        "sites_trained": [s for s, _ in kept],
        "num_examples": dict(sorted(num.items())),
    })
    line.update({k: dict(sorted(v.items())) for k, v in out.items() if v})
    return [m for _, m in kept]


_SET_ASIDE = ("sites_failed", "sites_refused", "sites_skipped", "sites_rejected", "epsilon")


def _set_aside(msg: Message, out: dict[str, dict[str, Any]]) -> bool:
    """Record a reply that brings no update (error, refusal, skip, no weights); True if so."""
    if msg.has_error():
        text = str(msg.error.reason)
        node = str(msg.metadata.src_node_id)
        code = reason_code_in(text)
        if code is not None:
            out["sites_refused"][node] = code
        else:
            out["sites_failed"][node] = text[-ERROR_TAIL:]
        return True
    site, metrics, info = reply_parts(msg)
    if metrics.get("epsilon") is not None:
        out["epsilon"][site] = float(as_float(metrics["epsilon"]))
    if REFUSED_KEY in info:
        out["sites_refused"][site] = str(info[REFUSED_KEY])
    elif SKIPPED_KEY in info:
        out["sites_skipped"][site] = str(info[SKIPPED_KEY])
    elif ARRAYS_KEY not in msg.content.array_records:
        out["sites_failed"][site] = "reply without weights"
    else:
        return False
    return True


def read_evaluate_replies(replies: Iterable[Message], line: dict[str, Any]) -> None:
    """``per_site_dice``, ``federated_dice`` (case-weighted) and failures into ``line``."""
    per_site: dict[str, float | None] = {}
    weights: dict[str, int] = {}
    failed: dict[str, str] = {}
    refused: dict[str, str] = {}
    for msg in replies:
        if msg.has_error():
            failed[str(msg.metadata.src_node_id)] = str(msg.error.reason)[-ERROR_TAIL:]
            continue
        site, metrics, info = reply_parts(msg)
        if REFUSED_KEY in info:
            refused[site] = str(info[REFUSED_KEY])
            continue
        per_site[site] = finite(metrics.get("dice"))
        weights[site] = as_int(metrics.get(WEIGHT_KEY, 0))
    line["per_site_dice"] = dict(sorted(per_site.items()))
    valid = [(d, weights[s]) for s, d in per_site.items() if d is not None]
    total = sum(w for _, w in valid)
    line["federated_dice"] = sum(d * w for d, w in valid) / total if total > 0 else None
    if failed:
        line["sites_failed_evaluation"] = failed
    if refused:
        line["sites_refused_evaluation"] = dict(sorted(refused.items()))


def _interval(metrics: MetricRecord, prefix: str) -> dict[str, float | None]:
    """``{dice, ci_low, ci_high}`` from a final reply's ``<prefix>dice`` etc."""
    return {k.replace("-", "_"): finite(metrics.get(f"{prefix}{k}")) for k in INTERVAL_KEYS}


def read_final_replies(replies: Iterable[Message]) -> dict[str, Any]:
    """The final (personalisation) round's replies as ``summary.json`` fields.

    Returns:
        ``per_site_final``: site -> ``global`` and ``personalised`` (each ``{dice, ci_low,
        ci_high}`` over the site's test cases; ``personalised`` is ``None`` without a
        personal model) and ``test_cases``; when there were any, ``sites_refused_final``
        (reason codes), ``sites_failed_final``, ``personalisation_skipped`` (site -> why)
        and ``epsilon`` (DP sites after fine-tuning).
    """
    per_site: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {k: {} for k in (
        "sites_refused_final", "sites_failed_final", "personalisation_skipped", "epsilon")}
    for msg in replies:
        if msg.has_error():
            text = str(msg.error.reason)
            code = reason_code_in(text)
            key = "sites_refused_final" if code is not None else "sites_failed_final"
            out[key][str(msg.metadata.src_node_id)] = code or text[-ERROR_TAIL:]
            continue
        site, metrics, info = reply_parts(msg)
        if REFUSED_KEY in info:
            out["sites_refused_final"][site] = str(info[REFUSED_KEY])
            continue
        if f"{FINAL_PREFIX}dice" not in metrics:
            out["sites_failed_final"][site] = "reply without the final figures"
            continue
        personal = f"{PERSONAL_PREFIX}dice" in metrics
        per_site[site] = {
            "global": _interval(metrics, FINAL_PREFIX),
            "personalised": _interval(metrics, PERSONAL_PREFIX) if personal else None,
            "test_cases": as_int(metrics.get(TEST_CASES_KEY, 0)),
        }
        if PERSONAL_SKIPPED_KEY in info:
            out["personalisation_skipped"][site] = str(info[PERSONAL_SKIPPED_KEY])
        if metrics.get("epsilon") is not None:
            out["epsilon"][site] = as_float(metrics["epsilon"])
    result: dict[str, Any] = {"per_site_final": dict(sorted(per_site.items()))}
    result.update({k: dict(sorted(v.items())) for k, v in out.items() if v})
    return result


__all__ = [
    "as_float",
    "as_int",
    "clean_train_replies",
    "finite",
    "read_evaluate_replies",
    "read_final_replies",
    "reason_code_in",
    "update_problem",
]
