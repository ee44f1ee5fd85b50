"""The coordinator's reading of replies: a broken or hostile site cannot poison the aggregate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedmed.federation.protocol import from_record, to_record
from fedmed.federation.replies import clean_train_replies, reason_code_in, update_problem

REFERENCE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32),
             "steps": np.array(7, np.int64)}


def _update(**changes: Any) -> dict[str, np.ndarray]:
    out = {k: np.full_like(v, 0.5) for k, v in REFERENCE.items()}
    out.update(changes)
    return out


@pytest.mark.parametrize(("update", "cases", "problem"), [
    (_update(), 5, None),
    (_update(w=np.full((3, 4), np.nan, np.float32)), 5, "non-finite"),
    (_update(b=np.array([0, 0, np.inf, 0], np.float32)), 5, "non-finite"),
    (_update(w=np.full((3, 4), 1e9, np.float32)), 5, "beyond"),
    (_update(w=np.zeros((4, 3), np.float32)), 5, "shape"),
    ({k: v for k, v in _update().items() if k != "b"}, 5, "do not match"),
    (_update(extra=np.zeros(2, np.float32)), 5, "do not match"),
    (_update(), 0, "0 training cases"),
    (_update(), -3, "-3 training cases"),
    (_update(), 10**9, "training cases"),
])
def test_update_problem_names_what_is_wrong(
    update: dict[str, np.ndarray], cases: int, problem: str | None
) -> None:
    found = update_problem(update, REFERENCE, cases)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_fedbn_updates_without_normalisation_tensors_are_expected() -> None:
    update = {k: v for k, v in _update().items() if k != "b"}
    assert update_problem(update, REFERENCE, 5, expected={"w", "steps"}) is None
    assert update_problem(_update(), REFERENCE, 5, expected={"w", "steps"}) is not None


def _reply(site: str, update: dict[str, np.ndarray] | None, cases: int,
           info: dict[str, Any] | None = None) -> Message:
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": cases, "train-loss": 0.5}),
        "fedmed": ConfigRecord({"site": site, "compression-kind": "none", **(info or {})}),
    })
    if update is not None:
        content["arrays"] = to_record(update)
    instruction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def test_clean_replies_keep_good_updates_and_record_the_rest(server_task_identity: Any) -> None:
    replies = [
        _reply("good", _update(), 4),
        _reply("poisoned", _update(w=np.full((3, 4), 1e12, np.float32)), 4),
        _reply("inflated", _update(), 10**9),
        _reply("refusing", None, 0, {"refused": "dp-required", "reason": "..."}),
    ]
    line: dict[str, Any] = {}
    kept = clean_train_replies(replies, REFERENCE, line)
    assert [m.content.config_records.get("fedmed") for m in kept] == [None]  # cleaned content
    assert line["sites_trained"] == ["good"] and line["num_examples"] == {"good": 4}
    assert set(line["sites_rejected"]) == {"poisoned", "inflated"}
    assert line["sites_refused"] == {"refusing": "dp-required"}


def test_records_keep_every_tensor_shape_including_scalars() -> None:
    back = from_record(to_record(REFERENCE))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in REFERENCE.items()}


def test_reason_codes_are_found_in_error_text() -> None:
    assert reason_code_in("<class 'SiteRefusal'>:<'too-few-secagg-participants'>") == (
        "too-few-secagg-participants")
    assert reason_code_in("app-not-approved") == "app-not-approved"
    assert reason_code_in("connection reset by peer") is None
