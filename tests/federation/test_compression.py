"""Packed update compression on a real model's state dict, through real Flower records.

The default U-Net (channels 16, 32, 64, 128, 2 residual units, 3 inputs, 5 classes) has 75
tensors; each array of a Flower ``ArrayRecord`` carries its own ~128-byte ``.npy`` header, so
compressed updates pack every tensor of one wire dtype into one flat array. These tests
check the round trip (names, shapes, dtypes, error bounds), the byte ratios measured on the
serialised records, and that malformed packed payloads are refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.serde import (
    array_record_from_proto,
    array_record_to_proto,
    config_record_from_proto,
    config_record_to_proto,
)

from fedmed.config import ModelConfig
from fedmed.errors import FederationError
from fedmed.federation.compression import (
    INDEX_KEYS,
    RELATIVE_ERROR_BOUND,
    compress,
    decompress,
    packed_key,
)
from fedmed.federation.protocol import record_bytes
from fedmed.models import build_model

PACKED = ("float16", "bfloat16", "int8")
WIRE = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}


@pytest.fixture(scope="module")
def model_pair() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trained, global) state dicts of the default model; trained = global + a small step."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 3, 5)
    reference = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    weights = {
        k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in reference.items()
    }
    return weights, reference


def _over_the_wire(
    payload: dict[str, np.ndarray], meta: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What the coordinator gets: both records serialised to protobuf and parsed back."""
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
    config = ConfigRecord({f"compression-{k}": v for k, v in meta.items()})
    arrays = array_record_from_proto(array_record_to_proto(arrays))
    config = config_record_from_proto(config_record_to_proto(config))
    return (
        {k: a.numpy() for k, a in arrays.items()},
        {k.removeprefix("compression-"): v for k, v in config.items()},
    )


def _reply_bytes(payload: dict[str, np.ndarray]) -> int:
    """The figure the coordinator logs as ``bytes_received`` for one reply."""
    return record_bytes(
        ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
    )


@pytest.mark.parametrize("kind", ["none", *PACKED])
@pytest.mark.parametrize("deltas", [True, False])
def test_round_trip_on_the_default_model(
    model_pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], kind: str, deltas: bool
) -> None:
    weights, reference = model_pair
    payload, meta = compress(weights, reference, kind, deltas)
    back = decompress(*_over_the_wire(payload, meta), reference)
    assert list(back) == list(weights)  # same names, same order
    for name, w in weights.items():
        assert back[name].shape == w.shape and back[name].dtype == w.dtype, name
    if kind == "none":
        for name, w in weights.items():
            np.testing.assert_array_equal(back[name], w)
        return
    for name, w in weights.items():
        err = np.abs(back[name].astype(np.float64) - w)
        sent = (w - reference[name]) if meta["deltas"] else w
        if kind == "int8":
            bound = np.abs(sent).max() / 127 / 2  # scale / 2
        else:
            # The dtype's rounding: relative for normal numbers, half the smallest subnormal
            # spacing for float16's tiny ones (bfloat16 has float32's range).
            tiny = 2.0**-25 if kind == "float16" else 0.0
            bound = np.abs(sent) * RELATIVE_ERROR_BOUND[kind] + tiny
        # float32 rounding of reference + delta adds at most one ulp of the weight.
        slack = np.abs(w) * 2.0**-23 * 2 + 1e-12
        assert np.all(err <= bound + slack), (kind, deltas, name, float(err.max()))


@pytest.mark.parametrize("kind", PACKED)
def test_packed_layout_is_one_array_per_dtype(
    model_pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], kind: str
) -> None:
    weights, reference = model_pair
    assert len(weights) == 75
    payload, meta = compress(weights, reference, kind, True)
    assert list(payload) == [packed_key(np.dtype(WIRE[kind]))]
    flat = payload[packed_key(np.dtype(WIRE[kind]))]
    assert flat.ndim == 1 and flat.dtype == WIRE[kind]
    assert flat.size == sum(w.size for w in weights.values())
    assert meta["names"] == list(weights)
    assert all(k in meta for k in INDEX_KEYS)
    if kind == "int8":
        assert meta["scale-keys"] == list(weights) and len(meta["scales"]) == 75
    # ``none`` keeps one float32 array per tensor, as the global model travels.
    plain, _ = compress(weights, reference, "none", True)
    assert list(plain) == list(weights)


def test_byte_ratios_on_the_default_model(
    model_pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
) -> None:
    weights, reference = model_pair
    full = _reply_bytes(compress(weights, reference, "none", True)[0])
    assert full > sum(w.nbytes for w in weights.values())  # headers are counted
    for kind, want in (("float16", 2.0), ("bfloat16", 2.0), ("int8", 3.5)):
        payload, meta = compress(weights, reference, kind, True)
        ratio = full / _reply_bytes(payload)
        assert ratio >= want, (kind, ratio)
        # The index moved to the ConfigRecord: count it too, against the whole uncompressed
        # reply (whose ArrayRecord protobuf holds the names, shapes and dtypes itself).
        whole_plain = array_record_to_proto(
            ArrayRecord({k: Array(v) for k, v in weights.items()})
        ).ByteSize()
        arrays = ArrayRecord({k: Array(v) for k, v in payload.items()})
        config = ConfigRecord({f"compression-{k}": v for k, v in meta.items()})
        whole = (
            array_record_to_proto(arrays).ByteSize() + config_record_to_proto(config).ByteSize()
        )
        assert whole_plain / whole >= want, (kind, whole_plain / whole)


@pytest.mark.parametrize("kind", PACKED)
def test_mixed_dtypes_shapes_and_integers(kind: str) -> None:
    rng = np.random.default_rng(5)
    reference = {
        "w": rng.normal(0, 1, (4, 3, 2)).astype(np.float32),
        "steps": np.array([5, 7], dtype=np.int64),
        "scalar": np.array(0.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "double": rng.normal(0, 1, (5,)),
        "mask": np.array([True, False, True]),
        "count": np.array([3], dtype=np.int32),
    }
    weights = {k: (v + 0.01 if v.dtype.kind == "f" else v + 1 if v.dtype.kind == "i" else ~v)
               for k, v in reference.items()}
    payload, meta = compress(weights, reference, kind, True)
    # One array per wire dtype: compressed floats, int64, bool, int32.
    assert len(payload) == 4
    back = decompress(*_over_the_wire(payload, meta), reference)
    assert list(back) == list(weights)
    for k, w in weights.items():
        assert back[k].shape == w.shape and back[k].dtype == w.dtype, k
        if w.dtype.kind != "f":
            np.testing.assert_array_equal(back[k], w)
        else:
            np.testing.assert_allclose(back[k], w, atol=1e-4)


def _good(
    pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], kind: str = "int8"
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    weights, reference = pair
    small = {k: weights[k] for k in list(weights)[:4]}
    payload, meta = compress(small, reference, kind, True)
    return payload, meta, reference


@pytest.mark.parametrize("missing", INDEX_KEYS)
def test_missing_index_is_refused(
    model_pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], missing: str
) -> None:
    payload, meta, reference = _good(model_pair)
    del meta[missing]
    with pytest.raises(FederationError, match=f"lacks its index \\({missing}"):
        decompress(payload, meta, reference)


@pytest.mark.parametrize("kind", PACKED)
def test_wrong_size_is_refused(
    model_pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], kind: str
) -> None:
    payload, meta, reference = _good(model_pair, kind)
    (key,) = payload
    for bad in (payload[key][:-1], np.concatenate([payload[key], payload[key][:1]])):
        with pytest.raises(FederationError, match=f"{key}.*truncated or corrupt"):
            decompress({key: bad}, meta, reference)
    with pytest.raises(FederationError, match="should be 1-D"):
        decompress({key: payload[key].astype(np.float32)}, meta, reference)
    with pytest.raises(FederationError, match=f"lacks array '{key}'"):
        decompress({}, meta, reference)
    with pytest.raises(FederationError, match="not in the update's index"):
        decompress({**payload, "stray": np.zeros(2, np.float32)}, meta, reference)


def test_inconsistent_index_is_refused(
    model_pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
) -> None:
    payload, meta, reference = _good(model_pair)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"offsets": [0, 0, 0, 0]}, "offset"),
        ({"names": meta["names"][:-1]}, "differ in length"),
        ({"dims": meta["dims"][:-1]}, "shapes are inconsistent"),
        ({"dtypes": ["<f4", "<f4", "nonsense", "<f4"]}, "not a NumPy dtype"),
        ({"scale-keys": [], "scales": []}, "no scale"),
    ]
    for change, message in cases:
        with pytest.raises(FederationError, match=message):
            decompress(payload, {**meta, **change}, reference)
    with pytest.raises(FederationError, match="no reference"):
        decompress(payload, meta, None)
