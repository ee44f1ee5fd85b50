"""End to end: the federation in Flower's simulation engine on a tiny real federation.

Two sites of four 24^3 NIfTI cases each (folder-per-case), a central test set, a U-Net
with channels (4, 8, 16), 16^3 patches and one local epoch per round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fedmed.cli.main import main as cli_main
from fedmed.config import load_config
from fedmed.errors import ConfigError
from fedmed.federation.rundir import SUMMARY_KEYS
from fedmed.federation.simulation import run_federated
from tests.support.federations import make_federation as make_tiny_federation

METRIC_KEYS = {
    "round", "central_dice", "central_dice_per_class", "per_site_dice", "train_loss",
    "wall_seconds", "bytes_sent", "bytes_received", "sites_trained",
}


def make_federation(root: Path, *, cases: int = 4, **federation: Any) -> Path:
    """Sites a and b (intensity shifts 0 and 0.5), a central test set, the YAML."""
    return make_tiny_federation(
        root, sites=("a", "b"), cases=cases, shift_step=0.5, secure=False,
        federation={"min_train_sites": 1, "min_available_sites": 2, "evaluate_sites": True,
                    **federation},
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["weights"]


@pytest.mark.slow
@pytest.mark.integration
def test_simulate_cli_writes_run_directory(tmp_path: Path) -> None:
    config = make_federation(tmp_path)
    out = tmp_path / "run"
    assert cli_main(["simulate", "--config", str(config), "--out", str(out)]) == 0

    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert METRIC_KEYS <= set(line)
    assert line["round"] == 1
    assert line["sites_trained"] == ["a", "b"]
    assert set(line["per_site_dice"]) == {"a", "b"}
    assert 0.0 <= line["central_dice"] <= 1.0
    assert set(line["central_dice_per_class"]) == {"blob"}
    assert line["train_loss"] > 0
    # 2 train + 2 evaluate messages carry the global weights; 2 replies carry weights back.
    n_params = sum(v.numel() for v in _weights(out).values())
    assert line["bytes_sent"] >= 4 * 4 * n_params
    assert 2 * 4 * n_params <= line["bytes_received"] < line["bytes_sent"]

    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["mode"] == "federated"
    assert summary["strategy"] == "fedavg" and summary["rounds"] == 1
    assert set(summary["per_site"]) == {"a", "b"}
    assert (out / "config.yaml").is_file() and (out / "checkpoint.pt").is_file()

    # The same folder again without --resume/--force is refused (exit 1, no traceback).
    assert cli_main(["simulate", "--config", str(config), "--out", str(out)]) == 1


def test_simulate_rejects_impossible_minimum(tmp_path: Path) -> None:
    config = make_federation(tmp_path, cases=3, min_available_sites=3)
    with pytest.raises(ConfigError, match="min_available_sites"):
        run_federated(load_config(config), tmp_path / "run")
    assert cli_main(["simulate", "--config", str(config), "--out", str(tmp_path / "r")]) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_fedbn_keeps_each_sites_normalisation_layers(tmp_path: Path) -> None:
    from fedmed.federation.site_state import load_site_norm, run_state_dir
    from fedmed.models import build_model, norm_parameter_names
    from fedmed.training.trainer import seed_everything

    cfg = load_config(make_federation(tmp_path, strategy="fedbn"))
    out = tmp_path / "run"
    summary = run_federated(cfg, out)
    assert summary["strategy"] == "fedbn"

    seed_everything(cfg.training.seed)
    initial = build_model(cfg.model, 1, cfg.num_classes)
    norm_keys = norm_parameter_names(initial)
    assert norm_keys
    init_state = initial.state_dict()
    final = _weights(out)
    # The global model's normalisation tensors were never aggregated ...
    for k in norm_keys:
        assert torch.equal(final[k], init_state[k]), k
    # ... while the shared tensors were.
    shared = [k for k in final if k not in norm_keys]
    assert any(not torch.equal(final[k], init_state[k]) for k in shared)
    # Each site keeps its own, trained normalisation tensors in its state folder, per run.
    run_id = (out / "run-id").read_text().strip()
    norms = {s: load_site_norm(run_state_dir(cfg.site_state_dir(s), run_id), before_round=2)
             for s in ("a", "b")}
    for s, norm in norms.items():
        assert norm is not None and set(norm) == norm_keys, s
        assert any(not np.array_equal(norm[k], init_state[k].numpy()) for k in norm_keys)
    assert any(not np.array_equal(norms["a"][k], norms["b"][k]) for k in norm_keys)


class _Crash(RuntimeError):
    pass


@pytest.mark.slow
@pytest.mark.integration
def test_resumed_run_ends_with_same_weights(tmp_path: Path) -> None:
    cfg = load_config(make_federation(tmp_path, strategy="fedadam", rounds=2))

    straight = run_federated(cfg, tmp_path / "straight")
    assert straight["rounds"] == 2

    def crash_after_first(line: dict[str, Any]) -> None:
        if line["round"] == 1:
            raise _Crash("coordinator dies after round 1")

    with pytest.raises(_Crash):
        run_federated(cfg, tmp_path / "resumed", on_round=crash_after_first)
    resumed_dir = tmp_path / "resumed"
    assert not (resumed_dir / "summary.json").exists()
    assert len((resumed_dir / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = run_federated(cfg, resumed_dir, resume=True)
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["round"] for s in lines] == [1, 2]
    a, b = _weights(tmp_path / "straight"), _weights(resumed_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["dice_mean"] == pytest.approx(straight["dice_mean"])


@pytest.mark.slow
@pytest.mark.integration
def test_failing_site_does_not_stop_the_round(tmp_path: Path) -> None:
    """Also the deployment path: the ServerApp reads everything from Flower's run config."""
    from flwr.serverapp import ServerApp

    from fedmed.federation.client_app import make_client_app
    from fedmed.federation.server_app import serve
    from fedmed.federation.simulation import _simulate, backend_config
    from fedmed.federation.site import simulated_sites

    config = make_federation(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["compression"] = {"kind": "int8"}
    config.write_text(yaml.safe_dump(raw))
    shutil.rmtree(tmp_path / "site-b")  # site b's data disappears before the round
    out = tmp_path / "run"
    run_config = {"fedmed-config": str(config), "run-dir": str(out), "resume": False,
                  "strategy": "", "rounds": 0}
    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        serve(grid, run_config)

    sites = simulated_sites(load_config(config))
    _simulate(server, make_client_app(sites=sites), 2, backend_config(load_config(config)),
              verbose=False)

    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["sites_trained"] == ["a"]
    # The failing site says only that it failed (its error text stays in its own log).
    assert line["sites_refused"] == {"b": "site-error"}
    assert "site-b" not in (out / "metrics.jsonl").read_text()
    assert set(line["per_site_dice"]) == {"a"}
    # b never trained from this round's global weights, so it evaluates none.
    assert line["sites_refused_evaluation"] == {"b": "weights-not-global"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice_mean"] is not None and summary["compression"] == "int8"
    # The one update travelled as int8 deltas: about a quarter of the float32 weights.
    n_params = sum(v.numel() for v in _weights(out).values())
    assert n_params <= line["bytes_received"] < 2 * n_params


# -- message plumbing without the simulation engine -------------------------------------------


def test_site_handler_and_coordinator_speak_the_same_protocol(
    tmp_path: Path, server_task_identity: Any
) -> None:
    """A real train message through the site's handler (FedProx, int8) and back through the
    coordinator's reply handling, next to a skipped site and a failed one."""
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )

    from fedmed.federation.client_app import handle_train
    from fedmed.federation.coordinator import Coordinator
    from fedmed.federation.replies import clean_train_replies
    from fedmed.federation.rundir import RunDir
    from fedmed.federation.site import simulated_sites

    cfg = load_config(make_federation(tmp_path, cases=3, strategy="fedprox", proximal_mu=0.1))
    cfg = cfg.with_changes(compression={"kind": "int8"})
    run = RunDir.create(tmp_path / "run", cfg)
    coord = Coordinator(cfg, run)
    glob = coord.initial_arrays()
    config = coord.request_config()
    config["server-round"] = 1
    config["proximal-mu"] = 0.1

    def instruction(node: int) -> Message:
        return Message(
            RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in glob.items()}),
                        "config": ConfigRecord(dict(config))}),
            dst_node_id=node, message_type=MessageType.TRAIN,
        )

    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    reply = handle_train(instruction(7), context, sites=simulated_sites(cfg))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 1  # 3 cases: 1 train, 1 val, 1 test (patients, not patches)
    info = reply.content["fedmed"]
    assert info["site"] == "a" and info["compression-kind"] == "int8"
    assert {a.dtype for a in reply.content["arrays"].values()} == {"int8"}

    skipped = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 1, "epsilon": 9.5}),
                    "fedmed": ConfigRecord({"site": "b", "skipped": "budget exhausted"})}),
        reply_to=instruction(8),
    )
    failed = Message(Error(code=0, reason="disk gone"), reply_to=instruction(9))
    line: dict[str, Any] = {}
    cleaned = clean_train_replies([failed, skipped, reply], glob, line)
    assert line["sites_trained"] == ["a"]
    assert line["sites_skipped"] == {"b": "budget exhausted"}
    assert list(line["sites_failed"].values()) == ["disk gone"]
    assert line["epsilon"] == {"b": 9.5}
    assert line["bytes_received"] < sum(v.nbytes for v in glob.values()) / 2
    (msg,) = cleaned
    weights = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    assert all(w.dtype == np.float32 for w in weights.values())
    assert any(not np.array_equal(weights[k], glob[k]) for k in glob)
    arrays, agg = coord.strategy.aggregate_train(1, cleaned)
    assert arrays is not None and agg is not None and agg["train-loss"] > 0


def test_site_from_node_config(tmp_path: Path) -> None:
    from fedmed.errors import FederationError, RequestRefused
    from fedmed.federation.site import simulated_sites, site_for_node, site_from_node_config
    from fedmed.policy import write_default_policy

    policy = write_default_policy(tmp_path / "site-policy.yaml", site="hospital-x")
    node = {"data-dir": "/data/hospital-x", "cache-dir": "/cache", "state-dir": "/var/fedmed",
            "policy": str(policy), "device": "cpu"}
    dep = site_from_node_config(node)
    assert (dep.name, dep.data_dir, dep.cache_dir, dep.state_dir, dep.device) == (
        "hospital-x", Path("/data/hospital-x"), Path("/cache"), Path("/var/fedmed"), "cpu"
    )
    assert dep.policy.reporting.min_cases_per_metric == 10  # the strict default
    assert site_from_node_config({**node, "site-name": "a"}).name == "a"
    # Deployment: the folders and a policy are required; the refusal says which code.
    for missing, code in (("cache-dir", "site-not-configured"),
                          ("state-dir", "site-not-configured"), ("policy", "no-policy")):
        with pytest.raises(RequestRefused) as err:
            site_from_node_config({k: v for k, v in node.items() if k != missing})
        assert err.value.code == code and missing in err.value.detail
    with pytest.raises(RequestRefused, match="policy init") as err:
        site_from_node_config({**node, "policy": str(tmp_path / "none.yaml")})
    assert err.value.code == "no-policy"

    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({
        "modalities": ["T1"], "labels": {0: "bg", 1: "fg"},
        "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "state_dir": "st"}],
    }))
    cfg = load_config(path)
    sim = simulated_sites(cfg)
    assert [s.name for s in sim] == ["a", "b"]
    assert sim[0].state_dir == tmp_path / "a" / ".fedmed-state"
    assert sim[1].state_dir == tmp_path / "st" and sim[1].data_dir == tmp_path / "b"
    assert sim[0].policy.reporting.min_cases_per_metric == 1  # permits the config's settings
    assert site_for_node({"partition-id": 1, "num-partitions": 2}, sim) is sim[1]
    with pytest.raises(FederationError, match="num-supernodes = 2"):
        site_for_node({"partition-id": 2}, sim)
