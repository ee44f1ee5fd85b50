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

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from fedmed.config import FederationConfig, load_config
from fedmed.errors import ConfigError

SHAPE = (24, 24, 24)
SITES = ("a", "b", "c")
MAX_WEIGHT = 10.0  # >= training cases of a site; small keeps the quantisation error small


def _write_case(folder: Path, rng: np.random.Generator, shift: float) -> None:
    folder.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = rng.uniform(9, 15, size=3)[:, None, None, None]
    label = (np.sqrt(((grid - centre) ** 2).sum(0)) < rng.uniform(4, 6)).astype(np.uint8)
    image = (rng.normal(1.0 + shift, 0.3, SHAPE) + 2.0 * label).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "T1.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "label.nii.gz")


def make_federation(root: Path, **sections: Any) -> Path:
    rng = np.random.default_rng(0)
    for k, site in enumerate(SITES):
        for i in range(4):
            _write_case(root / f"site-{site}" / f"case{i:02d}", rng, 0.25 * k)
    for i in range(2):
        _write_case(root / "central" / f"test{i:02d}", rng, 0.25)
    cfg: dict[str, Any] = {
        "name": "tiny-secagg",
        "modalities": ["T1"],
        "labels": {0: "background", 1: "blob"},
        "sites": [{"name": s, "path": f"site-{s}"} for s in SITES],
        "central_test": "central",
        "preprocessing": {
            "target_spacing": [2.0, 2.0, 2.0], "patch_size": [16, 16, 16],
            "patches_per_case": 1, "augment": False, "cache_dir": "cache",
        },
        "model": {"channels": [4, 8, 16], "num_res_units": 0},
        "training": {"batch_size": 2, "amp": False, "progress": False, "sw_batch_size": 4,
                     "device": "cpu"},
        "federation": {
            "rounds": 1, "local_epochs": 1, "min_train_sites": 2, "min_available_sites": 3,
            "client_resources": {"num_cpus": 1, "num_gpus": 0}, "max_parallel_sites": 1,
            "round_timeout_s": 120, "evaluate_sites": False,
        },
        "secure_aggregation": {"enabled": True, "clipping_range": 4.0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: FederationConfig, out: Path) -> tuple[dict[str, Any], dict[int, list[np.ndarray]],
                                                     dict[str, np.ndarray]]:
    """One simulated run with SecAgg+; what the coordinator received per node."""
    from flwr.serverapp import ServerApp

    from fedmed.federation.rundir import RunDir
    from fedmed.federation.secagg import SecAggCoordinator
    from fedmed.federation.simulation import _simulate, backend_config
    from fedmed.federation.site import make_client_app

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

    client = make_client_app(state_root=(out / "sites").resolve())
    _simulate(server, client, len(cfg.sites), backend_config(cfg), verbose=False)
    return json.loads((out / "summary.json").read_text()), masked, initial


def _true_update(cfg: FederationConfig, site: str, initial: dict[str, np.ndarray],
                 tmp: Path) -> tuple[dict[str, np.ndarray], int]:
    from fedmed.federation.coordinator import resolved_config
    from fedmed.federation.site import SiteSpec, train_site

    resolved, _ = resolved_config(cfg)
    result, _ = train_site(
        resolved, SiteSpec(name=site, state_dir=tmp / "recheck" / site), initial,
        server_round=1, total_rounds=1, local_epochs=1, run_name="recheck",
    )
    return result.weights, result.num_cases


def _final(out: Path) -> dict[str, np.ndarray]:
    weights = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["weights"]
    return {k: v.numpy() for k, v in weights.items()}


def _flat(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def test_secagg_rejects_compression_and_order_statistics(tmp_path: Path) -> None:
    from fedmed.federation.secagg import build_workflow, check_secagg_config

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
    from fedmed.federation.secagg import correlation, quantisation_error_bound

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
    assert len(line["sites_failed"]) == 1 and len(masked) == 2
    assert summary["dice_mean"] is not None

    from fedmed.federation.secagg import quantisation_error_bound

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
