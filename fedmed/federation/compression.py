"""Compression of the weights a site sends (and, symmetrically, what the server unpacks).

Pure NumPy, no Flower: a site calls :func:`compress` on its trained weights before it
replies, the coordinator calls :func:`decompress` on each reply before aggregation, so the
strategies always aggregate full-precision float32 weights.

Kinds (``cfg.compression.kind``):

- ``none``: float32 weights as they are (``deltas`` ignored: nothing is gained by them).
- ``float16``: IEEE half precision, of the weights or (``deltas: true``) of the difference
  to the round's global weights. Deltas are small numbers whose relative precision
  (2^-11) costs far less absolute error than rounding the weights themselves.
- ``bfloat16``: the upper 16 bits of float32 (8-bit mantissa, float32's range), shipped as
  ``uint16`` because NumPy has no bfloat16; rounding is to nearest even.
- ``int8``: always deltas, symmetric per-tensor quantisation ``q = round(d / s)`` with
  ``s = max|d| / 127``; the scales travel in the metadata.

Only floating-point tensors are compressed; integer buffers (e.g. counters) pass unchanged.
Metadata is a flat mapping of str -> scalar/list that fits a Flower ``ConfigRecord``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmed.errors import FederationError

KINDS = ("none", "float16", "bfloat16", "int8")

# Worst-case elementwise error of one round trip, relative to the compressed quantity
# (the weight itself, or the delta when deltas are sent); int8 is relative to max|delta|.
RELATIVE_ERROR_BOUND = {"none": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8, "int8": 0.5 / 127}


def uses_deltas(kind: str, deltas: bool) -> bool:
    """Whether ``kind`` with option ``deltas`` sends differences to the reference weights."""
    if kind == "int8":
        return True
    return deltas and kind != "none"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise FederationError(
            f"compression.kind must be one of {list(KINDS)}, got {kind!r}; fix the federation "
            "config's compression section"
        )


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (``uint16``), rounding to nearest even; NaN kept NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Round to nearest even on the 16 dropped bits (carry into the exponent is correct).
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bfloat16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) -> float32."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def compress(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    kind: str,
    deltas: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pack weights for sending.

    Args:
        weights: name -> array (the site's trained weights).
        reference: the round's global weights (same names); needed when deltas are sent.
        kind: ``none`` | ``float16`` | ``bfloat16`` | ``int8``.
        deltas: send ``weights - reference`` (16-bit kinds; int8 always does).

    Returns:
        ``(payload, metadata)``: arrays to put in the reply's ArrayRecord, and a flat
        mapping for its ConfigRecord (``kind``, ``deltas``, ``scale-keys``, ``scales``).

    Raises:
        FederationError: unknown ``kind``, or deltas asked without a matching reference.
    """
    _check_kind(kind)
    use_deltas = uses_deltas(kind, deltas)
    if use_deltas:
        if reference is None:
            raise FederationError(f"compression {kind!r} with deltas needs the reference weights")
        missing = sorted(set(weights) - set(reference))
        if missing:
            raise FederationError(f"compression: reference weights lack {missing[:3]}")
    payload: dict[str, np.ndarray] = {}
    scale_keys: list[str] = []
    scales: list[float] = []
    for name, w in weights.items():
        arr = np.asarray(w)
        if kind == "none" or not np.issubdtype(arr.dtype, np.floating):
            payload[name] = arr
            continue
        x = arr.astype(np.float32)
        if use_deltas:
            x = x - np.asarray(reference[name], dtype=np.float32)  # type: ignore[index]
        if kind == "float16":
            payload[name] = x.astype(np.float16)
        elif kind == "bfloat16":
            payload[name] = float32_to_bfloat16_bits(x)
        else:  # int8
            peak = float(np.max(np.abs(x))) if x.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            payload[name] = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
            scale_keys.append(name)
            scales.append(scale)
    meta: dict[str, Any] = {"kind": kind, "deltas": use_deltas}
    if kind == "int8":
        meta["scale-keys"] = scale_keys
        meta["scales"] = scales
    return payload, meta


def decompress(
    payload: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any],
    reference: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Unpack what :func:`compress` produced into float32 weights (integer arrays unchanged).

    Args:
        payload: the received arrays.
        metadata: the received metadata (``kind``, ``deltas``, int8 ``scale-keys``/``scales``).
        reference: the global weights the site started from (when deltas were sent).

    Raises:
        FederationError: unknown kind, missing reference or scales.
    """
    kind = str(metadata.get("kind", "none"))
    _check_kind(kind)
    if kind == "none":
        return {k: np.asarray(v) for k, v in payload.items()}
    use_deltas = bool(metadata.get("deltas", False))
    if use_deltas and reference is None:
        raise FederationError(f"decompress {kind!r}: the update holds deltas but no reference")
    scale_of: dict[str, float] = {}
    if kind == "int8":
        keys = list(metadata.get("scale-keys", []))
        vals = list(metadata.get("scales", []))
        if len(keys) != len(vals):
            raise FederationError("decompress int8: scale-keys and scales differ in length")
        scale_of = dict(zip(keys, (float(v) for v in vals), strict=True))
    out: dict[str, np.ndarray] = {}
    for name, p in payload.items():
        arr = np.asarray(p)
        if kind == "float16" and arr.dtype == np.float16:
            x = arr.astype(np.float32)
        elif kind == "bfloat16" and arr.dtype == np.uint16:
            x = bfloat16_bits_to_float32(arr)
        elif kind == "int8" and arr.dtype == np.int8:
            if name not in scale_of:
                raise FederationError(f"decompress int8: no scale for {name!r}")
            x = arr.astype(np.float32) * np.float32(scale_of[name])
        else:  # passed through uncompressed (integer buffers)
            out[name] = arr
            continue
        if use_deltas:
            ref = reference.get(name) if reference is not None else None
            if ref is None:
                raise FederationError(f"decompress: reference weights lack {name!r}")
            x = np.asarray(ref, dtype=np.float32) + x
        out[name] = x
    return out


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw bytes of the arrays' data (without serialisation headers)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def compression_ratio(weights: Mapping[str, np.ndarray], kind: str, deltas: bool = True) -> float:
    """float32 bytes / compressed bytes for ``weights`` (what a benchmark reports)."""
    ref = {k: np.zeros_like(v) for k, v in weights.items()}
    payload, _ = compress(weights, ref, kind, deltas)
    full = sum(
        a.size * 4 if np.issubdtype(a.dtype, np.floating) else a.nbytes
        for a in (np.asarray(v) for v in weights.values())
    )
    return float(full) / max(1, payload_bytes(payload))


__all__ = [
    "KINDS",
    "RELATIVE_ERROR_BOUND",
    "bfloat16_bits_to_float32",
    "compress",
    "compression_ratio",
    "decompress",
    "float32_to_bfloat16_bits",
    "payload_bytes",
    "uses_deltas",
]
