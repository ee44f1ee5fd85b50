"""Bytes on the wire per site per round against the model's float32 size.

A real simulation (generated federation, 4 sites x ~2 cases, ~30x36x30 volumes) with the
default U-Net width (channels 16, 32, 64, 128, 2 residual units; quick: 8, 16, 32) runs
2 rounds of uncompressed FedAvg. The coordinator counts the bytes of the ArrayRecords it
actually sends and receives (``bytes_sent`` / ``bytes_received`` in ``metrics.jsonl``: the
serialized ``Array.data`` of every tensor, i.e. NumPy's ``.npy`` framing included).

On top of that, the same round's messages are rebuilt with the run's final weights and the
exact config record the coordinator sends, and serialised the way Flower 1.41 ships them
(the content's object tree: RecordDict, ArrayRecord, Array and ArrayChunk objects, each
``deflate()``-d as pushed to the SuperLink), so the figure includes protobuf framing, the
tensor names and the federation config travelling with every message.

Figures (all relative to the float32 size of the model's state dict):

* ``sent_over_float32`` / ``received_over_float32``: coordinator byte accounting of the real
  run, per site per round. Target <= 1.05x.
* ``sent_serialized_over_float32`` / ``received_serialized_over_float32``: Flower's
  serialised message content. Target <= 1.05x.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

from benchmarks import _fixtures as fx
from benchmarks.common import Figure

NAME = "wire"


def serialized_bytes(content: Any) -> int:
    """Bytes of a Flower ``RecordDict`` as shipped: every object of its tree, deflated.

    Flower 1.41 sends a message's metadata as a small protobuf and its content as
    content-addressed objects (arrays split into chunks of at most 5 MiB); identical
    objects are sent once, as here.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values()))


def _messages(cfg: Any, weights: dict[str, Any]) -> tuple[Any, Any]:
    """The train instruction and a site's reply of one round, rebuilt with real content."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedmed.federation import protocol as proto

    # What the coordinator puts in every train message, plus Flower's round number.
    config = proto.request_config(
        cfg, total_rounds=cfg.federation.rounds,
        local_epochs=cfg.federation.local_epochs, strategy=cfg.federation.strategy,
        run_name="fedmed-bench-wire",
    )
    config[proto.ROUND_KEY] = 1
    sent = RecordDict({proto.ARRAYS_KEY: proto.to_record(weights), proto.CONFIG_KEY: config})
    reply = RecordDict({
        proto.ARRAYS_KEY: proto.to_record(weights),
        proto.METRICS_KEY: MetricRecord({"num-examples": 2, "train-loss": 1.0, "seconds": 1.0}),
        proto.INFO_KEY: ConfigRecord({"site": cfg.site_names[0], "compression-kind": "none",
                                      "compression-deltas": False}),
    })
    return sent, reply


def run(quick: bool = False) -> list[Figure]:
    """One real run; ``quick``: a narrower U-Net, 1 round."""
    import torch

    from fedmed.federation.simulation import run_federated

    channels = (8, 16, 32) if quick else (16, 32, 64, 128)
    res_units = 0 if quick else 2
    rounds = 1 if quick else 2
    yaml_path = fx.synth_federation(4, 2, test_cases=1)
    cfg = fx.small_config(yaml_path, channels=channels, num_res_units=res_units, rounds=rounds)
    fx.warm_cache(cfg)
    out = fx.run_dir("wire")
    try:
        run_federated(cfg, out, force=True)
        lines = fx.metrics_lines(out)
        weights = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["weights"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    state = {k: v.numpy() for k, v in weights.items()}
    float32 = sum(v.size * 4 for v in state.values())
    site_rounds = sum(len(line["sites_trained"]) for line in lines)
    sent = sum(int(line["bytes_sent"]) for line in lines) / site_rounds
    received = sum(int(line["bytes_received"]) for line in lines) / site_rounds
    msg_sent, msg_reply = _messages(cfg, state)
    ser_sent, ser_received = serialized_bytes(msg_sent), serialized_bytes(msg_reply)
    params = sum(v.size for v in state.values())
    model = (f"U-Net {list(channels)} ({res_units} res units): {params:,} values in "
             f"{len(state)} tensors, float32 {float32:,} B")
    run_note = (f"{len(cfg.sites)} sites x {rounds} round(s) of a real simulation "
                f"(uncompressed FedAvg); {model}")
    extra: dict[str, Any] = {
        "float32_bytes": float32, "sent_per_site_round": sent,
        "received_per_site_round": received, "serialized_sent": ser_sent,
        "serialized_received": ser_received, "tensors": len(state),
    }

    def fig(name: str, value: float, how: str) -> Figure:
        return Figure(NAME, name, value, "x", "<= 1.05x", value <= 1.05, how, extra)

    return [
        fig("sent_over_float32", sent / float32,
            f"coordinator accounting {sent:,.0f} B per site per round; {run_note}"),
        fig("received_over_float32", received / float32,
            f"coordinator accounting {received:,.0f} B per site per round; {run_note}"),
        fig("sent_serialized_over_float32", ser_sent / float32,
            f"Flower object tree of the train message {ser_sent:,} B (weights + the "
            f"federation config it carries); {model}"),
        fig("received_serialized_over_float32", ser_received / float32,
            f"Flower object tree of a site's reply {ser_received:,} B; {model}"),
    ]


if __name__ == "__main__":
    for f in run(quick="--quick" in sys.argv):
        print(f"{f.name}: {f.value:.4g} {f.unit} (target {f.target}, met {f.met}) -- {f.detail}")
