"""Secure aggregation (Flower SecAgg+) in Flower's simulation engine on a tiny federation.

Three sites of four 24^3 NIfTI cases each, a U-Net with channels (4, 8, 16), 16^3 patches,
one round of one local epoch. The coordinator's view of a site (its masked vector) is
captured where the coordinator receives it, and compared with the site's true update,
recomputed outside Flower with the same seeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmed.config import FederationConfig, load_config
from fedmed.errors import ConfigError
from tests.support.federations import SITES, make_federation

MAX_WEIGHT = 10.0  # >= training cases of a site; small keeps the quantisation error small


def _run(cfg: FederationConfig, out: Path) -> tuple[dict[str, Any], dict[int, list[np.ndarray]],
                                                     dict[str, np.ndarray]]:
    """One simulated run with SecAgg+; what the coordinator received per node."""
    from flwr.serverapp import ServerApp

    from fedmed.federation.client_app import make_client_app
    from fedmed.federation.rundir import RunDir
    from fedmed.federation.secagg_coordinator import SecAggCoordinator
    from fedmed.federation.simulation import _simulate, backend_config
    from fedmed.federation.site import simulated_sites

    masked: dict[int, list[np.ndarray]] = {}
    initial: dict[str, np.ndarray] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        run = RunDir.create(out, cfg)
        coord = SecAggCoordinator(
            cfg, run, max_weight=MAX_WEIGHT,
            on_masked=lambda node, arrays: masked.__setitem__(node, arrays),
        )
        initial.update(coord.initial_arrays())
        coord.run_rounds(grid)

    client = make_client_app(sites=simulated_sites(cfg))
    _simulate(server, client, len(cfg.sites), backend_config(cfg), verbose=False)
    return json.loads((out / "summary.json").read_text()), masked, initial


def _true_update(cfg: FederationConfig, site: str, initial: dict[str, np.ndarray],
                 tmp: Path) -> tuple[dict[str, np.ndarray], int]:
    from dataclasses import replace

    from fedmed.federation.coordinator import resolved_config
    from fedmed.federation.site import simulated_sites, train_site

    resolved, _ = resolved_config(cfg)
    spec = next(s for s in simulated_sites(resolved) if s.name == site)
    result, _ = train_site(
        resolved, replace(spec, state_dir=tmp / "recheck" / site), initial,
        server_round=1, total_rounds=1, local_epochs=1, run_name="recheck",
    )
    return result.weights, result.num_cases


def _final(out: Path) -> dict[str, np.ndarray]:
    weights = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["weights"]
    return {k: v.numpy() for k, v in weights.items()}


def _flat(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def test_secagg_rejects_compression_and_order_statistics(tmp_path: Path) -> None:
    from fedmed.federation.secagg_coordinator import build_workflow, check_secagg_config

    cfg = load_config(make_federation(tmp_path, compression={"kind": "int8"}))
    with pytest.raises(ConfigError, match="compression.kind"):
        check_secagg_config(cfg)
    cfg = cfg.with_changes(compression={"kind": "none"}, federation={"strategy": "fedmedian"})
    with pytest.raises(ConfigError, match="fedmedian"):
        check_secagg_config(cfg)
    cfg = cfg.with_changes(
        federation={"strategy": "fedavg"},
        secure_aggregation={"num_shares": 3, "reconstruction_threshold": 2,
                            "quantization_range": 1 << 20},
    )
    check_secagg_config(cfg)
    wf = build_workflow(cfg)
    assert (wf.num_shares, wf.reconstruction_threshold) == (3, 2)
    assert wf.clipping_range == 4.0 and wf.quantization_range == 1 << 20


@pytest.mark.slow
@pytest.mark.integration
def test_coordinator_sees_only_the_aggregate(tmp_path: Path) -> None:
    from tests.support.oracles import correlation, quantisation_error_bound

    cfg = load_config(make_federation(tmp_path))
    out = tmp_path / "run"
    summary, masked, initial = _run(cfg, out)

    assert summary["secure_aggregation"] is True and summary["rounds"] == 1
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["sites_trained"] == list(SITES)
    assert 0.0 <= line["central_dice"] <= 1.0
    assert len(masked) == 3

    keys = list(initial)
    updates = {s: _true_update(cfg, s, initial, tmp_path) for s in SITES}
    assert {s: n for s, (_, n) in updates.items()} == line["num_examples"]
    start = _flat(initial, keys)
    true_delta = {s: _flat(w, keys) - start for s, (w, _) in updates.items()}

    # What the coordinator received from each site: uniform noise, unrelated to any update.
    for arrays in masked.values():
        vec = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays[1:]])
        assert vec.shape == start.shape
        for s in SITES:
            assert abs(correlation(vec, true_delta[s])) < 0.1
            assert abs(correlation(vec, _flat(updates[s][0], keys))) < 0.1

    # ... while the aggregate is plain FedAvg (weights = training cases) within quantisation.
    total = sum(n for _, n in updates.values())
    fedavg = sum(_flat(w, keys) * n for w, n in updates.values()) / total
    final = _flat(_final(out), keys)
    bound = quantisation_error_bound(cfg, total, MAX_WEIGHT) + 1e-5
    assert np.max(np.abs(final - fedavg)) < bound
    # Positive control: the aggregate does carry the sites' training (not the initial model).
    assert np.max(np.abs(final - start)) > 20 * bound
    assert correlation(final - start, sum(true_delta.values())) > 0.99


@pytest.mark.slow
@pytest.mark.integration
def test_site_dropping_out_within_threshold(tmp_path: Path) -> None:
    cfg = load_config(make_federation(tmp_path))
    # Site c's data disappears: it shares its keys, then fails in the masked-vector stage;
    # SecAgg+ rebuilds its pairwise masks from the other two sites' shares (threshold 2).
    shutil.rmtree(tmp_path / "site-c")
    out = tmp_path / "run"
    summary, masked, initial = _run(cfg, out)

    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["sites_trained"] == ["a", "b"]
    # its refusal reaches the coordinator as a reason code, without its error text
    assert list(line["sites_refused"].values()) == ["site-error"] and len(masked) == 2
    assert "site-c" not in (out / "metrics.jsonl").read_text()
    assert summary["dice_mean"] is not None

    from tests.support.oracles import quantisation_error_bound

    keys = list(initial)
    updates = [_true_update(cfg, s, initial, tmp_path) for s in ("a", "b")]
    total = sum(n for _, n in updates)
    fedavg = sum(_flat(w, keys) * n for w, n in updates) / total
    final = _flat(_final(out), keys)
    assert np.max(np.abs(final - fedavg)) < quantisation_error_bound(cfg, total, MAX_WEIGHT) + 1e-5


@pytest.mark.slow
@pytest.mark.integration
def test_secagg_with_patient_level_dp(tmp_path: Path) -> None:
    cfg = load_config(make_federation(
        tmp_path, privacy={"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None,
                           "max_epsilon": 1000.0, "max_grad_norm": 1.0},
    ))
    out = tmp_path / "run"
    summary, masked, _ = _run(cfg, out)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["sites_trained"] == list(SITES) and len(masked) == 3
    # Each site spent privacy inside its trainer; the coordinator only got masked vectors.
    assert set(line["epsilon"]) == set(SITES)
    assert all(0 < e < 1000 for e in line["epsilon"].values())
    assert set(summary["epsilon"]) == set(SITES)
