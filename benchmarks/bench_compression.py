"""Smaller updates: 16-bit and 8-bit deltas against uncompressed FedAvg.

The same generated federation (4 sites x ~4 cases, voxels 2.5x larger, resampled to 5.5 mm:
~30x36x30 volumes; 2 central test cases), the same seed and the same U-Net (the default
width: channels 16, 32, 64, 128, 2 residual units, 1.19 M weights; 16^3 patches) run 3
rounds x 1 local epoch of FedAvg four times: uncompressed, float16
deltas, bfloat16 deltas and int8 quantised deltas. Training is deterministic on CPU (seeded
sites, replies aggregated in site order), so the Dice differences are the compression's.

Figures per compressed kind:

* ``<kind>_fewer_bytes``: bytes a site sends per round (``bytes_received`` of the run's
  ``metrics.jsonl`` over sites x rounds), uncompressed over compressed. Targets: 16-bit
  >= 2x, int8 >= 3.5x. Compressed replies pack all tensors into one flat array (the
  uncompressed one keeps one array, hence one ~128 B .npy header, per tensor); the
  detail also gives the serialised size of the index that travels in the ConfigRecord.
* ``<kind>_dice_cost``: central Dice of the uncompressed run minus the compressed run's
  (positive = the compression lost Dice). Target for 16-bit: <= 0.01; int8: reported.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks import _fixtures as fx
from benchmarks.common import Figure

NAME = "compression"
KINDS = ("none", "float16", "bfloat16", "int8")


def _one(
    yaml_path: Path, kind: str, sites: int, rounds: int, channels: tuple[int, ...], res: int
) -> dict[str, Any]:
    from fedmed.federation.simulation import run_federated

    cfg = fx.small_config(yaml_path, sites=sites, channels=channels, num_res_units=res,
                          rounds=rounds, compression=kind)
    fx.warm_cache(cfg)
    out = fx.run_dir(f"comp-{kind}")
    try:
        summary = run_federated(cfg, out, force=True)
        lines = fx.metrics_lines(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    site_rounds = sum(len(line["sites_trained"]) for line in lines)
    return {
        "kind": kind,
        "received_per_site_round": sum(int(x["bytes_received"]) for x in lines) / site_rounds,
        "sent_per_site_round": sum(int(x["bytes_sent"]) for x in lines) / site_rounds,
        "dice": float(lines[-1]["central_dice"]),
        "summary_dice": summary.get("dice_mean"),
    }


def _index_bytes(
    channels: tuple[int, ...], res: int, kinds: tuple[str, ...]
) -> dict[str, int]:
    """Serialised size of the compression metadata (index, scales) a reply's ConfigRecord
    carries for this model: the cost that moved out of the ArrayRecord, reported for honesty."""
    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.common.serde import config_record_to_proto

    from fedmed.config import ModelConfig
    from fedmed.federation.compression import compress
    from fedmed.models import build_model

    model = build_model(ModelConfig(channels=channels, num_res_units=res), 3, 5)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    ref = {k: np.zeros_like(v) for k, v in weights.items()}
    out = {}
    for kind in kinds:
        _, meta = compress(weights, ref, kind, True)
        record = ConfigRecord({f"compression-{k}": v for k, v in meta.items()})
        out[kind] = int(config_record_to_proto(record).ByteSize())
    return out


def run(quick: bool = False) -> list[Figure]:
    """Four runs side by side; ``quick``: 2 sites, 1 round, uncompressed vs int8 only."""
    kinds = ("none", "int8") if quick else KINDS
    sites, rounds = (2, 1) if quick else (4, 3)
    yaml_path = fx.synth_federation(4, 4, test_cases=2)
    # Full: the default U-Net width, so per-tensor framing (.npy headers) weighs what it
    # does in practice; quick: a tiny one.
    channels, res = ((8, 16, 32), 0) if quick else ((16, 32, 64, 128), 2)
    runs = {k: _one(yaml_path, k, sites, rounds, channels, res) for k in kinds}
    index_bytes = _index_bytes(channels, res, kinds)
    base = runs["none"]
    setup = (
        f"{sites} sites x ~4 cases (~30x36x30), U-Net {list(channels)} ({res} res units), "
        f"16^3 patches, {rounds} "
        f"round(s) x 1 epoch, seed 0; uncompressed: {base['received_per_site_round']:,.0f} B "
        f"per site per round, central Dice {base['dice']:.4f}"
    )
    figures: list[Figure] = []
    for kind in kinds[1:]:
        r = runs[kind]
        fewer = base["received_per_site_round"] / r["received_per_site_round"]
        cost = base["dice"] - r["dice"]
        want = 3.5 if kind == "int8" else 2.0
        figures.append(Figure(
            NAME, f"{kind}_fewer_bytes", fewer, "x", f">= {want:g}x", fewer >= want,
            f"{kind} deltas: {r['received_per_site_round']:,.0f} B per site per round (all "
            f"tensors packed into one flat array, so one ~128 B .npy header instead of one per "
            f"tensor; the index of names/shapes/offsets travels in the reply's ConfigRecord, "
            f"{index_bytes.get(kind, 0):,} B serialised, not in bytes_received); {setup}",
            {"runs": runs},
        ))
        figures.append(Figure(
            NAME, f"{kind}_dice_cost", cost, "Dice",
            "<= 0.01" if kind != "int8" else "(reported)",
            cost <= 0.01 if kind != "int8" else None,
            f"central Dice after the last round {r['dice']:.4f} vs uncompressed "
            f"{base['dice']:.4f} (positive = lost); {setup}",
            {"runs": runs},
        ))
    return figures


if __name__ == "__main__":
    for f in run(quick="--quick" in sys.argv):
        print(f"{f.name}: {f.value:.4g} {f.unit} (target {f.target}, met {f.met}) -- {f.detail}")
