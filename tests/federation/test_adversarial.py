"""A coordinator that attacks a site: every attack is refused with its reason code.

Real Flower messages go through the real fedmed ``ClientApp`` of a site whose policy the
hospital wrote. The coordinator is honest first (a DP round trains), then tries one attack
per request -- DP off, weak noise, a loose delta or clipping norm, a forbidden strategy or
architecture, too many rounds or epochs, a path or the data split in the request, crafted
weights to evaluate, a request that makes the site fail, a plain request where secure
aggregation is required, a new run name to reset ε, ε past the lifetime cap -- and is honest
again. Each attack must be refused with its code, leave the site's state folder (split,
ledgers, last global) byte for byte as it was, and reveal nothing patient-level.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmed.config import FederationConfig, load_config
from fedmed.federation.client_app import make_client_app
from fedmed.federation.site import SiteSpec, simulated_sites
from fedmed.policy import load_policy
from fedmed.training.ledger import compute_epsilon, lifetime_report
from tests.support.federations import make_federation
from tests.support.policies import write_policy

pytestmark = [pytest.mark.slow]

CASE_ID = "MRN{i:04d}_DOE_JOHN_1961"
SIGMA = 1.0
BATCH = 2
TRAIN_CASES = 5  # 8 cases: 5 train, 1 val, 2 test (the site's own fixed split)
Q = BATCH / TRAIN_CASES
STEPS = 3  # ceil(1 / q): one local epoch


def _policy(path: Path, **sections: Any) -> Path:
    base: dict[str, Any] = {
        "privacy": {"dp_required": True, "min_noise_multiplier": 0.8, "max_delta": 1e-5,
                    "max_clipping_norm": 1.0,
                    # room for exactly three DP rounds of this site, over all runs
                    "lifetime_epsilon": compute_epsilon([(SIGMA, Q, 3 * STEPS)], 1e-5) + 0.01},
        "secure_aggregation": {"required": False, "min_participants": 2},
        "training": {"allowed_strategies": ["fedavg", "fedprox"],
                     "allowed_architectures": ["unet"], "max_rounds": 10,
                     "max_local_epochs": 2},
        "reporting": {"min_cases_per_metric": 1, "decimals": 2, "training_loss": "without_dp"},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return write_policy(path, **base)


class Coordinator:
    """Builds real Flower messages as fedmed's coordinator does, then lets a test bend them."""

    def __init__(self, cfg: FederationConfig, site: SiteSpec, tmp: Path) -> None:
        from flwr.app import Context, RecordDict

        from fedmed.federation.coordinator import Coordinator as RealCoordinator
        from fedmed.federation.rundir import RunDir

        self.real = RealCoordinator(cfg, RunDir.create(tmp / "run", cfg), run_name="run-A")
        self.weights = self.real.initial_arrays()
        self.site = site
        self.app = make_client_app(sites=[site])
        self.context = Context(run_id=1, node_id=7, node_config={"partition-id": 0},
                               state=RecordDict(), run_config={})
        self.replies: list[Any] = []

    def config(self, server_round: int = 1, **changes: Any) -> dict[str, Any]:
        config = dict(self.real.request_config())
        config["server-round"] = server_round
        plan = json.loads(config["fedmed-config"])
        for dotted, value in changes.pop("plan", {}).items():
            *path, key = dotted.split(".")
            target = plan
            for p in path:
                target = target.setdefault(p, {})
            target[key] = value
        config["fedmed-config"] = json.dumps(plan)
        config.update(changes)
        return config

    def send(self, kind: str, config: dict[str, Any], weights: dict[str, np.ndarray] | None = None
             ) -> Any:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        arrays = self.weights if weights is None else weights
        message = Message(
            RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                               for k, v in arrays.items()}),
                        "config": ConfigRecord(config)}),
            dst_node_id=7,
            message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE,
        )
        reply = self.app(message, self.context)
        self.replies.append(reply)
        return reply


def _state(folder: Path) -> dict[str, str]:
    """Every file of the site's state folder and its hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(reply: Any) -> str | None:
    info = reply.content.config_records["fedmed"]
    return str(info["refused"]) if "refused" in info else None


@pytest.fixture()
def federation(tmp_path: Path, server_task_identity: Any) -> tuple[Coordinator, SiteSpec]:
    path = make_federation(
        tmp_path, sites=("a", "b"), cases=8, case_id=CASE_ID, secure=False,
        model={"channels": [4, 8], "num_res_units": 0, "norm": "instance"},
        training={"learning_rate": 1e-2, "schedule": "constant"},
        federation={"rounds": 3, "local_epochs": 1, "min_train_sites": 2},
        privacy={"enabled": True, "noise_multiplier": SIGMA, "target_epsilon": None,
                 "delta": 1e-5, "max_grad_norm": 1.0, "expected_batch_size": BATCH},
    )
    cfg = load_config(path)
    site = replace(simulated_sites(cfg)[0],
                   policy=load_policy(_policy(tmp_path / "site-a-policy.yaml")))
    return Coordinator(cfg, site, tmp_path), site


def _honest_round(coord: Coordinator, server_round: int, run: str = "run-A") -> Any:
    reply = coord.send("train", coord.config(server_round, **{"run-name": run}))
    assert _refused(reply) is None, _refused(reply)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == TRAIN_CASES and metrics["epsilon"] > 0
    assert "train-loss" not in metrics  # the policy keeps the loss in under DP
    assert len(reply.content.array_records["arrays"]) == len(coord.weights)
    return reply


ATTACKS: list[tuple[str, str, Callable[[Coordinator], Any]]] = [
    ("DP switched off", "dp-required",
     lambda c: c.send("train", c.config(plan={"privacy.enabled": False}))),
    ("noise multiplier below the floor", "noise-below-floor",
     lambda c: c.send("train", c.config(plan={"privacy.noise_multiplier": 0.1}))),
    ("sigma planned from a huge target epsilon", "noise-below-floor",
     lambda c: c.send("train", c.config(plan={"privacy.noise_multiplier": None,
                                               "privacy.target_epsilon": 1e6}))),
    ("delta above the ceiling", "delta-above-ceiling",
     lambda c: c.send("train", c.config(plan={"privacy.delta": 0.01}))),
    ("clipping norm above the ceiling", "clipping-above-ceiling",
     lambda c: c.send("train", c.config(plan={"privacy.max_grad_norm": 100.0}))),
    ("strategy not allowed", "strategy-not-allowed",
     lambda c: c.send("train", c.config(plan={"federation.strategy": "fedmedian"},
                                        strategy="fedmedian"))),
    ("architecture not allowed", "architecture-not-allowed",
     lambda c: c.send("train", c.config(plan={"model.architecture": "fusion"}))),
    ("rounds above the ceiling", "rounds-above-ceiling",
     lambda c: c.send("train", c.config(plan={"federation.rounds": 1000},
                                        **{"total-rounds": 1000}))),
    ("local epochs above the ceiling", "local-epochs-above-ceiling",
     lambda c: c.send("train", c.config(plan={"federation.local_epochs": 50},
                                        **{"local-epochs": 50}))),
    ("a validation split below k (val_fraction 0.001)", "site-owned-setting",
     lambda c: c.send("evaluate", c.config(plan={"training.val_fraction": 0.001}))),
    ("a data folder in the config", "site-owned-setting",
     lambda c: c.send("train", c.config(plan={"root": "/etc", "sites": [
         {"name": "a", "path": "/etc"}]}))),
    ("a cache folder in the config", "site-owned-setting",
     lambda c: c.send("train", c.config(plan={"preprocessing.cache_dir": "/tmp/exfiltrate"}))),
    ("evaluation of crafted weights", "weights-not-global",
     lambda c: c.send("evaluate", c.config(),
                      {k: np.zeros_like(v) for k, v in c.weights.items()})),
    ("a request that makes the site fail (wrong tensor shapes)", "site-error",
     lambda c: c.send("train", c.config(),
                      {k: np.zeros((1, 2, 3), np.float32) for k in c.weights})),
    ("a request that is not a run plan", "invalid-request",
     lambda c: c.send("train", c.config(**{"fedmed-config": "{not json"}))),
]


def test_a_coordinator_cannot_make_a_site_do_what_its_policy_forbids(
    federation: tuple[Coordinator, SiteSpec], tmp_path: Path
) -> None:
    coord, site = federation
    _honest_round(coord, 1)
    honest_eval = coord.send("evaluate", coord.config(1))
    assert _refused(honest_eval) is None
    dice = honest_eval.content.metric_records["metrics"]["dice"]
    assert dice == round(dice, 2)  # rounded as the policy says

    table: list[tuple[str, str, bool]] = []
    before = _state(site.state_dir)
    for name, code, attack in ATTACKS:
        reply = attack(coord)
        table.append((name, str(_refused(reply)), _refused(reply) == code))
        assert _refused(reply) == code, (name, _refused(reply))
        assert "arrays" not in reply.content.array_records, name
        assert dict(reply.content.metric_records["metrics"]) == {}, name
        assert _state(site.state_dir) == before, f"{name} changed the site's state"

    # No secure aggregation where the policy requires it: the same site, a stricter policy.
    strict = replace(site, policy=load_policy(_policy(
        tmp_path / "strict.yaml", secure_aggregation={"required": True, "min_participants": 2})))
    coord.app = make_client_app(
        sites=[strict])
    reply = coord.send("train", coord.config(2))
    table.append(("no secure aggregation where required", str(_refused(reply)),
                  _refused(reply) == "secagg-required"))
    assert _refused(reply) == "secagg-required" and _state(site.state_dir) == before
    # Evaluation over fewer cases than k (1 validation case, k = 5).
    few = replace(site, policy=load_policy(_policy(
        tmp_path / "k5.yaml", reporting={"min_cases_per_metric": 5})))
    coord.app = make_client_app(
        sites=[few])
    reply = coord.send("evaluate", coord.config(1))
    table.append(("evaluation over fewer cases than k", str(_refused(reply)),
                  _refused(reply) == "too-few-cases-for-metric"))
    assert _refused(reply) == "too-few-cases-for-metric"

    # Honest again: round 2 of the same run trains.
    coord.app = make_client_app(
        sites=[site])
    _honest_round(coord, 2)
    # A new run name does not reset epsilon: the lifetime ledger composes both runs, and
    # the dataset's cap (three rounds) lets the new run train one round, not two.
    _honest_round(coord, 1, run="run-B")
    spent = lifetime_report(site.state_dir)
    assert len(spent) == 1 and len(spent[0]["runs"]) == 2
    assert spent[0]["epsilon"] == pytest.approx(
        compute_epsilon([(SIGMA, Q, 3 * STEPS)], 1e-5), rel=1e-9)
    before = _state(site.state_dir)
    reply = coord.send("train", coord.config(2, **{"run-name": "run-B"}))
    table.append(("a new run name to reset epsilon, past the lifetime cap", str(_refused(reply)),
                  _refused(reply) == "epsilon-cap-reached"))
    assert _refused(reply) == "epsilon-cap-reached" and _state(site.state_dir) == before
    reply = coord.send("train", coord.config(1, **{"run-name": "run-C"}))
    assert _refused(reply) == "epsilon-cap-reached" and _state(site.state_dir) == before

    assert len(table) >= 18
    (tmp_path / "attacks.json").write_text(json.dumps(table, indent=1))
    _assert_nothing_patient_level(coord.replies, site)


def _assert_nothing_patient_level(replies: list[Any], site: SiteSpec) -> None:
    """No case id, file name or path of the site in anything the coordinator received."""
    texts = []
    for reply in replies:
        content = reply.content
        for rec in content.config_records.values():
            texts += [f"{k}={v}" for k, v in rec.items()]
        for rec in content.metric_records.values():
            texts += [f"{k}={v}" for k, v in rec.items()]
        for rec in content.array_records.values():
            texts += list(rec.keys())
    blob = "\n".join(texts)
    forbidden = ["MRN", "DOE_JOHN", ".nii", str(site.data_dir), str(site.state_dir),
                 "Traceback", "Error:"]
    hits = [f for f in forbidden if f in blob]
    assert not hits, hits
