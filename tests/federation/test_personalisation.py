"""Personalisation: Ditto's personal model across a site restart, the final round, fine-tuning.

Real Flower messages, built as fedmed's coordinator builds them, go through the real fedmed
``ClientApp`` of a site (two sites of eight 24^3 NIfTI cases: 5 train, 1 val, 2 test each);
the whole coordinator runs on an in-process grid that hands every message to the
ClientApp. A U-Net with channels (4, 8), 16^3 patches, one local epoch per round.

What is checked: a restarted site continues its saved Ditto model (and would not without
it); fine-tuning opens nothing of another site and trains on exactly the site's own
training cases; the final round sends aggregates only, rounded, over at least k cases, is
refused below k or above the epoch ceiling, and needs no secure aggregation (it uploads
nothing); the personal model is a ``model.pt`` that ``fedmed predict`` takes; DP
personalisation is planned into sigma and recorded in the ledger; the coordinator writes
``per_site_final`` into ``summary.json``, also with secure aggregation on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmed.config import FederationConfig, load_config
from fedmed.federation.client_app import make_client_app
from fedmed.federation.site import SiteSpec, simulated_sites, split_ids
from fedmed.policy import load_policy
from fedmed.training.trainer import LocalTrainer
from tests.support.federations import make_federation
from tests.support.policies import write_policy

pytestmark = [pytest.mark.slow]

RUN = "run-A"
LAMBDA = 0.5
FINAL_KEYS = {"test-cases", "final-dice", "final-ci-low", "final-ci-high"}
PERSONAL_KEYS = {"personal-dice", "personal-ci-low", "personal-ci-high"}


def _config(tmp: Path, **federation: Any) -> FederationConfig:
    path = make_federation(
        tmp, sites=("a", "b"), cases=8, secure=False,
        model={"channels": [4, 8], "num_res_units": 0, "norm": "instance"},
        training={"learning_rate": 1e-2, "schedule": "constant"},
        federation={"rounds": 2, "local_epochs": 1, "min_train_sites": 1,
                    "min_available_sites": 2, "ditto_lambda": LAMBDA, **federation},
    )
    return load_config(path)


class Sender:
    """Real Flower messages from fedmed's coordinator, to one site's ClientApp."""

    def __init__(self, cfg: FederationConfig, run: Path) -> None:
        from fedmed.federation.coordinator import Coordinator
        from fedmed.federation.rundir import RunDir

        self.coordinator = Coordinator(cfg, RunDir.create(run, cfg), run_name=RUN)
        self.weights = self.coordinator.initial_arrays()

    def config(self, server_round: int, *, final: bool = False) -> dict[str, Any]:
        config = dict(self.coordinator.request_config())
        config["server-round"] = server_round
        if final:
            config["final-round"] = True
        return config

    def send(self, app: Any, context: Any, config: dict[str, Any],
             weights: dict[str, np.ndarray]) -> Any:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        message = Message(
            RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                               for k, v in weights.items()}),
                        "config": ConfigRecord(config)}),
            dst_node_id=context.node_id, message_type=MessageType.TRAIN,
        )
        return app(message, context)


def _context(node: int = 7, partition: int = 0) -> Any:
    """A fresh ClientApp context: nothing of an earlier process's state."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=node, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


def _refused(reply: Any) -> str | None:
    info = reply.content.config_records["fedmed"]
    return str(info["refused"]) if "refused" in info else None


def _metrics(reply: Any) -> dict[str, Any]:
    assert _refused(reply) is None, _refused(reply)
    return dict(reply.content.metric_records["metrics"])


def _arrays(reply: Any) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}


def _spy_fits(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``LocalTrainer.fit``: its proximal weight, start weights and case ids."""
    fits: list[dict[str, Any]] = []
    real = LocalTrainer.fit

    def fit(self: LocalTrainer, cases: list[Any], epochs: int, **kwargs: Any) -> Any:
        fits.append({"mu": kwargs.get("mu", 0.0), "epochs": epochs,
                     "cases": sorted(c.case_id for c in cases),
                     "start": {k: v.numpy().copy() for k, v in self.get_weights().items()}})
        return real(self, cases, epochs, **kwargs)

    monkeypatch.setattr(LocalTrainer, "fit", fit)
    return fits


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_final_metrics(metrics: dict[str, Any], keys: set[str], decimals: int) -> None:
    """Aggregates only, rounded, each mean inside its interval; no per-case value."""
    assert set(metrics) == keys, set(metrics) ^ keys
    assert metrics["test-cases"] == 2
    for prefix in ("final-", "personal-"):
        if f"{prefix}dice" in metrics:
            low, dice, high = (metrics[f"{prefix}{k}"] for k in ("ci-low", "dice", "ci-high"))
            assert 0.0 <= low <= dice <= high <= 1.0
            assert all(v == round(v, decimals) for v in (low, dice, high))


def test_dittos_personal_model_survives_a_site_restart(
    tmp_path: Path, server_task_identity: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmed.cli.main import main as cli_main
    from fedmed.data.io import read_image
    from fedmed.federation.site_state import load_personal, run_state_dir
    from fedmed.training.checkpoint import load_model

    cfg = _config(tmp_path, personalization="ditto")
    site = simulated_sites(cfg)[0]
    sender = Sender(cfg, tmp_path / "run")
    fits = _spy_fits(monkeypatch)
    run_dir = run_state_dir(site.state_dir, RUN)

    # Round 1: the personal model starts as the first global model and is trained with
    # Ditto's pull towards it.
    w1 = sender.weights
    reply = sender.send(make_client_app(sites=[site]), _context(), sender.config(1), w1)
    assert _metrics(reply)["num-examples"] == 5
    personal = [f for f in fits if f["mu"] == LAMBDA]
    assert len(personal) == 1 and _same(personal[0]["start"], w1)
    v1 = load_personal(run_dir, before_round=2)
    assert v1 is not None and not _same(v1, w1)

    # The site restarts: a new ClientApp, a fresh context; round 2 continues the saved model.
    w2 = _arrays(reply)
    reply = sender.send(make_client_app(sites=[site]), _context(), sender.config(2), w2)
    _metrics(reply)
    personal = [f for f in fits if f["mu"] == LAMBDA]
    assert len(personal) == 2
    assert _same(personal[1]["start"], v1) and not _same(personal[1]["start"], w2)
    v2 = load_personal(run_dir, before_round=3)
    assert v2 is not None and not _same(v2, v1)

    # Final round, after another restart: the global and the personal model scored on the
    # site's two test cases; aggregates only, no weights back.
    reply = sender.send(make_client_app(sites=[site]), _context(),
                        sender.config(3, final=True), _arrays(reply))
    assert "arrays" not in reply.content.array_records
    _check_final_metrics(_metrics(reply), FINAL_KEYS | PERSONAL_KEYS, decimals=4)
    assert len(fits) == 4  # the final round of a Ditto run trains nothing more

    # The personal model is saved in model.pt format, and `fedmed predict` takes it.
    path = run_dir / "personal-model.pt"
    loaded = load_model(path)
    assert loaded.extra["mode"] == "personalised" and loaded.extra["site"] == "a"
    assert _same({k: v.numpy() for k, v in loaded.model.state_dict().items()}, v2)
    case = sorted((tmp_path / "site-a").glob("case*"))[0]
    out = tmp_path / "mask.nii.gz"
    assert cli_main(["predict", "--model", str(path), "--image", f"T1={case / 'T1.nii.gz'}",
                     "--out", str(out)]) == 0
    assert read_image(out).spatial_shape == (24, 24, 24)

    # The control: without the saved model a restarted site would start again from the
    # global weights -- which is what the checks above rule out.
    for p in (run_dir / "ditto").iterdir():
        p.unlink()
    sender.send(make_client_app(sites=[site]), _context(), sender.config(2), w2)
    assert _same([f for f in fits if f["mu"] == LAMBDA][-1]["start"], w2)


def _booby_trap(folder: Path) -> None:
    """Every image of another site becomes garbage: reading one would fail the request."""
    for p in folder.rglob("*.nii.gz"):
        p.write_bytes(b"not an image: this site's data must never be read")


def _record_opened() -> tuple[list[str], list[bool]]:
    """Paths this process opens or lists from now on (audit hooks; ``active[0] = False`` stops)."""
    opened: list[str] = []
    active = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if active[0] and event in ("open", "os.listdir", "os.scandir") and args:
            if isinstance(args[0], str | bytes | os.PathLike):
                opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    return opened, active


def _strict_site(cfg: FederationConfig, tmp: Path, **reporting: Any) -> SiteSpec:
    """Site a under a policy that requires secure aggregation and allows 2 local epochs."""
    policy = write_policy(
        tmp / "policy-a.yaml",
        secure_aggregation={"required": True, "min_participants": 2},
        training={"max_local_epochs": 2},
        reporting={"min_cases_per_metric": 2, "decimals": 2, **reporting},
    )
    return replace(simulated_sites(cfg)[0], policy=load_policy(policy))


def test_finetuning_reads_only_the_sites_own_training_cases(
    tmp_path: Path, server_task_identity: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, personalization="finetune", personalization_epochs=2)
    site = _strict_site(cfg, tmp_path)
    sender = Sender(cfg, tmp_path / "run")
    _booby_trap(tmp_path / "site-b")
    fits = _spy_fits(monkeypatch)
    app = make_client_app(sites=[site])
    opened, active = _record_opened()
    try:
        reply = sender.send(app, _context(), sender.config(3, final=True), sender.weights)
    finally:
        active[0] = False
    # Accepted although the policy requires secure aggregation: the final round uploads
    # nothing (no weights in the reply), and k = 2 test cases stand behind every figure.
    assert "arrays" not in reply.content.array_records
    _check_final_metrics(_metrics(reply), FINAL_KEYS | PERSONAL_KEYS, decimals=2)
    # Fine-tuning: one fit of two epochs on exactly the site's own training cases.
    (fit,) = fits
    assert fit["epochs"] == 2 and fit["cases"] == split_ids(cfg, site)["train"]
    assert _same(fit["start"], sender.weights)
    # Nothing of site b was opened or listed (its images would have failed the request).
    own, other = str(tmp_path / "site-a"), str(tmp_path / "site-b")
    assert any(p.startswith(own) for p in opened)  # the hook sees the site's own reads
    assert not [p for p in opened if p.startswith(other)]
    assert (site.state_dir / "runs" / RUN / "personal-model.pt").is_file()

    # A coordinator that resumed asks again: the same answer, without training again.
    again = sender.send(make_client_app(sites=[site]), _context(),
                        sender.config(3, final=True), sender.weights)
    assert _metrics(again) == _metrics(reply) and len(fits) == 1


def test_final_round_refusals(tmp_path: Path, server_task_identity: Any) -> None:
    cfg = _config(tmp_path, personalization="finetune", personalization_epochs=2)
    site = _strict_site(cfg, tmp_path, min_cases_per_metric=3)
    split_ids(cfg, site)  # the site's fixed split exists before the requests
    before = _state(site.state_dir)
    app = make_client_app(sites=[site])

    def final(sender: Sender, server_round: int = 3) -> str | None:
        config = sender.config(server_round, final=True)
        reply = sender.send(app, _context(), config, sender.weights)
        assert "arrays" not in reply.content.array_records
        assert dict(reply.content.metric_records["metrics"]) == {}
        return _refused(reply)

    sender = Sender(cfg, tmp_path / "run")
    # k = 3 but two test cases: refused before any image is read, nothing written.
    assert final(sender) == "too-few-cases-for-metric"
    # Fine-tuning for more epochs than the policy allows per request.
    longer = cfg.with_changes(federation={"personalization_epochs": 3})
    assert final(Sender(longer, tmp_path / "run-longer")) == "local-epochs-above-ceiling"
    # A final round that does not come right after the last round.
    assert final(sender, 2) == "invalid-request"
    assert _state(site.state_dir) == before


class InProcessGrid:
    """A Flower grid that hands every message to the sites' ClientApp in this process."""

    def __init__(self, app: Any, num_sites: int) -> None:
        self.app = app
        self.contexts = {n + 1: _context(n + 1, n) for n in range(num_sites)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def test_coordinator_writes_each_sites_final_figures(
    tmp_path: Path, server_task_identity: Any
) -> None:
    from fedmed.federation.coordinator import Coordinator
    from fedmed.federation.rundir import RunDir
    from fedmed.federation.secagg_coordinator import SecAggCoordinator

    cfg = _config(tmp_path, personalization="finetune", personalization_epochs=1, rounds=1)
    sites = simulated_sites(cfg)
    run = RunDir.create(tmp_path / "run", cfg)
    Coordinator(cfg, run).run_rounds(InProcessGrid(make_client_app(sites=sites), 2))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["personalization"] == "finetune"
    final = summary["per_site_final"]
    assert set(final) == {"a", "b"}
    for entry in final.values():
        assert entry["test_cases"] == 2
        for model in ("global", "personalised"):
            scored = entry[model]
            assert set(scored) == {"dice", "ci_low", "ci_high"}
            assert scored["ci_low"] <= scored["dice"] <= scored["ci_high"]
    assert "sites_refused_final" not in summary

    # Under secure aggregation the final round goes over the Message API (nothing to mask):
    # sites whose policy requires secure aggregation answer it.
    secure = cfg.with_changes(secure_aggregation={"enabled": True},
                              federation={"min_train_sites": 2})
    strict = [replace(s, policy=_strict_site(cfg, tmp_path).policy) for s in sites]
    coord = SecAggCoordinator(secure, RunDir.create(tmp_path / "secure", secure))
    out = coord.final_stage(InProcessGrid(make_client_app(sites=strict), 2),
                            coord.initial_arrays())
    assert set(out["per_site_final"]) == {"a", "b"}
    assert "sites_refused_final" not in out


def _dp_config(tmp: Path, **federation: Any) -> FederationConfig:
    cfg = _config(tmp, **federation)
    return cfg.with_changes(privacy={
        "enabled": True, "noise_multiplier": None, "target_epsilon": 8.0, "delta": 1e-5,
        "max_grad_norm": 1.0, "expected_batch_size": 2,
    })


def _ledger(site: SiteSpec) -> Any:
    from fedmed.training.ledger import PrivacyLedger, find_ledgers

    (path,) = find_ledgers(site.state_dir / "privacy")
    return PrivacyLedger.load(path)


def _planned_sigma(cfg: FederationConfig, epochs: int) -> float:
    """Sigma that reaches the target epsilon over ``epochs`` epochs of 5 training cases."""
    from fedmed.training.dp import noise_multiplier_for, sample_rate_for, steps_per_epoch

    q = sample_rate_for(cfg.privacy, 5)
    return noise_multiplier_for(cfg.privacy, q, epochs * steps_per_epoch(q), None)


def test_personal_training_under_dp_is_planned_and_recorded(
    tmp_path: Path, server_task_identity: Any
) -> None:
    # Ditto: the personal model's DP steps are recorded next to the global update's, with
    # the sigma planned for both over the run (2 rounds x 1 epoch, twice).
    cfg = _dp_config(tmp_path / "ditto", personalization="ditto")
    site = simulated_sites(cfg)[0]
    sender = Sender(cfg, tmp_path / "ditto" / "run")
    reply = sender.send(make_client_app(sites=[site]), _context(), sender.config(1),
                        sender.weights)
    entries = _ledger(site).entries
    assert [e.round for e in entries] == [1, 1]
    assert entries[0].noise_multiplier == entries[1].noise_multiplier == pytest.approx(
        _planned_sigma(cfg, 4))
    assert _metrics(reply)["epsilon"] == pytest.approx(entries[0].epsilon)

    # Fine-tuning in the final round: paid for and recorded (round 3, its 1 epoch), with the
    # sigma of a run of 2 x 1 epochs plus 1 of fine-tuning; the reply carries the new epsilon.
    cfg = _dp_config(tmp_path / "ft", personalization="finetune", personalization_epochs=1)
    site = simulated_sites(cfg)[0]
    sender = Sender(cfg, tmp_path / "ft" / "run")
    reply = sender.send(make_client_app(sites=[site]), _context(),
                        sender.config(3, final=True), sender.weights)
    (entry,) = _ledger(site).entries
    assert (entry.round, entry.epochs) == (3, 1)
    assert entry.noise_multiplier == pytest.approx(_planned_sigma(cfg, 3))
    metrics = _metrics(reply)
    assert metrics["epsilon"] == pytest.approx(entry.epsilon) and PERSONAL_KEYS <= set(metrics)
