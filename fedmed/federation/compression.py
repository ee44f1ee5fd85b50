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
Every kind but ``none`` packs all tensors sharing a wire dtype into ONE flat array
(``packed-float16``, ``packed-int64``, ...), because each array of a Flower ``ArrayRecord``
carries a fixed ~128-byte ``.npy`` header that no compression shrinks (75 tensors: ~9.6 kB).
The index that restores names, shapes and dtypes (``names``, ``dtypes``, ``ndims``, ``dims``,
``offsets``) travels with ``kind``, ``deltas`` and the int8 scales in the metadata, a flat
mapping of str -> scalar/list that fits a Flower ``ConfigRecord``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmed.errors import FederationError

KINDS = ("none", "float16", "bfloat16", "int8")

# Packed payloads: one flat array per wire dtype, keyed ``packed-<dtype name>``; the index
# that cuts them back into tensors is these metadata keys (ConfigRecord-friendly lists).
PACKED_PREFIX = "packed-"
INDEX_KEYS = ("names", "dtypes", "ndims", "dims", "offsets")

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


def _wire_dtype(kind: str, dtype: np.dtype) -> np.dtype:
    """The dtype a tensor of ``dtype`` travels as under ``kind`` (integers pass unchanged)."""
    if not np.issubdtype(dtype, np.floating):
        return dtype
    return np.dtype({"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}[kind])


def packed_key(wire: np.dtype) -> str:
    """ArrayRecord key of the flat array holding every tensor that travels as ``wire``."""
    return f"{PACKED_PREFIX}{np.dtype(wire).name}"


def compress(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    kind: str,
    deltas: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pack weights for sending.

    ``none`` keeps one float32 array per tensor (what Flower's ArrayRecord does for the
    global model). Every other kind packs all tensors that travel with the same dtype into
    ONE flat array (``packed-float16``, ``packed-int64``, ...): each array in an ArrayRecord
    carries its own ~128-byte ``.npy`` header, which for a 75-tensor U-Net is what kept
    16-bit just under 2x. The index (names, original dtypes, shapes, offsets) travels in the
    metadata, i.e. the reply's ConfigRecord, next to the int8 scales.

    Args:
        weights: name -> array (the site's trained weights).
        reference: the round's global weights (same names); needed when deltas are sent.
        kind: ``none`` | ``float16`` | ``bfloat16`` | ``int8``.
        deltas: send ``weights - reference`` (16-bit kinds; int8 always does).

    Returns:
        ``(payload, metadata)``: arrays to put in the reply's ArrayRecord, and a flat
        mapping for its ConfigRecord: ``kind``, ``deltas`` and, for packed kinds,
        ``names``, ``dtypes`` (original, ``numpy.dtype.str``), ``ndims``, ``dims`` (all
        shapes concatenated), ``offsets`` (element offset in the tensor's packed array);
        int8 adds ``scale-keys`` and ``scales``.

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
    meta: dict[str, Any] = {"kind": kind, "deltas": use_deltas}
    if kind == "none":
        return {name: np.asarray(w) for name, w in weights.items()}, meta
    arrays = {name: np.asarray(w) for name, w in weights.items()}
    # Offsets first, so every packed array is allocated once and filled in place.
    sizes: dict[np.dtype, int] = {}
    offsets: list[int] = []
    for arr in arrays.values():
        wire = _wire_dtype(kind, arr.dtype)
        offsets.append(sizes.get(wire, 0))
        sizes[wire] = sizes.get(wire, 0) + int(arr.size)
    packed = {wire: np.empty(n, dtype=wire) for wire, n in sizes.items()}
    scale_keys: list[str] = []
    scales: list[float] = []
    for (name, arr), start in zip(arrays.items(), offsets, strict=True):
        dest = packed[_wire_dtype(kind, arr.dtype)][start : start + arr.size]
        ref = reference[name] if use_deltas and reference is not None else None
        scale = _encode_into(dest, arr, kind, ref)
        if scale is not None:
            scale_keys.append(name)
            scales.append(scale)
    meta.update({
        "names": list(arrays),
        "dtypes": [a.dtype.str for a in arrays.values()],
        "ndims": [int(a.ndim) for a in arrays.values()],
        "dims": [int(d) for a in arrays.values() for d in a.shape],
        "offsets": offsets,
    })
    if kind == "int8":
        meta["scale-keys"] = scale_keys
        meta["scales"] = scales
    return {packed_key(wire): arr for wire, arr in packed.items()}, meta


def _encode_into(
    dest: np.ndarray, arr: np.ndarray, kind: str, reference: np.ndarray | None
) -> float | None:
    """Write one tensor (minus ``reference`` when given) into ``dest``; int8: its scale."""
    if dest.dtype == arr.dtype and not np.issubdtype(arr.dtype, np.floating):
        dest[:] = arr.ravel()  # integer tensors travel bit-exact
        return None
    x = arr.astype(np.float32).ravel()
    if reference is not None:
        x = x - np.asarray(reference, dtype=np.float32).ravel()
    if kind == "float16":
        dest[:] = x.astype(np.float16)
        return None
    if kind == "bfloat16":
        dest[:] = float32_to_bfloat16_bits(x)
        return None
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    dest[:] = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return scale


def _index(
    metadata: Mapping[str, Any], kind: str
) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """``(name, original dtype, shape, offset)`` per tensor from a packed update's metadata."""
    missing = [k for k in INDEX_KEYS if k not in metadata]
    if missing:
        raise FederationError(
            f"decompress {kind!r}: the update lacks its index ({', '.join(missing)} in the "
            f"reply's ConfigRecord, keys 'compression-<name>'); expected what "
            "fedmed.federation.compression.compress returns; site and coordinator must run "
            "the same fedmed version"
        )
    names = [str(n) for n in metadata["names"]]
    dtype_strs = [str(d) for d in metadata["dtypes"]]
    ndims = [int(n) for n in metadata["ndims"]]
    dims = [int(d) for d in metadata["dims"]]
    offsets = [int(o) for o in metadata["offsets"]]
    if not len(names) == len(dtype_strs) == len(ndims) == len(offsets):
        raise FederationError(
            f"decompress {kind!r}: index lists differ in length (names {len(names)}, dtypes "
            f"{len(dtype_strs)}, ndims {len(ndims)}, offsets {len(offsets)}); the update is "
            "corrupt, re-run the site"
        )
    if sum(ndims) != len(dims) or min(ndims + dims + offsets, default=0) < 0:
        raise FederationError(
            f"decompress {kind!r}: index shapes are inconsistent (ndims sum to {sum(ndims)}, "
            f"{len(dims)} dims given, or a negative entry); the update is corrupt"
        )
    out = []
    pos = 0
    for name, dstr, nd, off in zip(names, dtype_strs, ndims, offsets, strict=True):
        try:
            dtype = np.dtype(dstr)
        except TypeError as exc:
            raise FederationError(
                f"decompress {kind!r}: {name!r} has dtype {dstr!r}, not a NumPy dtype"
            ) from exc
        out.append((name, dtype, tuple(dims[pos : pos + nd]), off))
        pos += nd
    return out


def decompress(
    payload: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any],
    reference: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Unpack what :func:`compress` produced: the original names, shapes and dtypes.

    Floating tensors come back in their original dtype (float32 for a model's state dict),
    integer tensors bit-exact.

    Args:
        payload: the received arrays (``none``: one per tensor; else the packed arrays).
        metadata: the received metadata (``kind``, ``deltas``, the index, int8 scales).
        reference: the global weights the site started from (when deltas were sent).

    Raises:
        FederationError: unknown kind, missing reference, index or scales, or packed arrays
            whose dtype or size disagree with the index.
    """
    kind = str(metadata.get("kind", "none"))
    _check_kind(kind)
    if kind == "none":
        return {k: np.asarray(v) for k, v in payload.items()}
    use_deltas = bool(metadata.get("deltas", False))
    if use_deltas and reference is None:
        raise FederationError(f"decompress {kind!r}: the update holds deltas but no reference")
    index = _index(metadata, kind)
    scale_of = _scales(metadata) if kind == "int8" else {}
    flat = _packed_arrays(payload, index, kind)
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, off in index:
        wire = _wire_dtype(kind, dtype)
        part = flat[packed_key(wire)][off : off + math.prod(shape)]
        if wire == dtype and not np.issubdtype(dtype, np.floating):
            out[name] = part.reshape(shape).copy()
            continue
        if kind == "float16":
            x = part.astype(np.float32)
        elif kind == "bfloat16":
            x = bfloat16_bits_to_float32(part)
        else:  # int8
            if name not in scale_of:
                raise FederationError(f"decompress int8: no scale for {name!r}")
            x = part.astype(np.float32) * np.float32(scale_of[name])
        x = x.reshape(shape)
        if use_deltas:
            ref = reference.get(name) if reference is not None else None
            if ref is None:
                raise FederationError(f"decompress: reference weights lack {name!r}")
            x = np.asarray(ref, dtype=np.float32) + x
        out[name] = x.astype(dtype, copy=False)
    return out


def _scales(metadata: Mapping[str, Any]) -> dict[str, float]:
    keys = list(metadata.get("scale-keys", []))
    vals = list(metadata.get("scales", []))
    if len(keys) != len(vals):
        raise FederationError("decompress int8: scale-keys and scales differ in length")
    return dict(zip(keys, (float(v) for v in vals), strict=True))


def _packed_arrays(
    payload: Mapping[str, np.ndarray],
    index: list[tuple[str, np.dtype, tuple[int, ...], int]],
    kind: str,
) -> dict[str, np.ndarray]:
    """The packed arrays the index needs, each checked: flat, its wire dtype, exact length.

    Anything else is a truncated or foreign payload.
    """
    need: dict[str, int] = {}
    for name, dtype, shape, off in index:
        key = packed_key(_wire_dtype(kind, dtype))
        if off != need.get(key, 0):
            raise FederationError(
                f"decompress {kind!r}: {name!r} sits at offset {off} of {key!r}, expected "
                f"{need.get(key, 0)} (tensors are packed back to back in index order); the "
                "update is corrupt"
            )
        need[key] = off + math.prod(shape)
    flat: dict[str, np.ndarray] = {}
    for key, n in need.items():
        if key not in payload:
            raise FederationError(
                f"decompress {kind!r}: the update lacks array {key!r} (got {sorted(payload)})"
            )
        arr = np.asarray(payload[key])
        want = np.dtype(key.removeprefix(PACKED_PREFIX))
        if arr.ndim != 1 or arr.dtype != want or arr.size != n:
            raise FederationError(
                f"decompress {kind!r}: array {key!r} should be 1-D {want.name} with {n} "
                f"elements for the {len(index)} indexed tensors, got {arr.ndim}-D "
                f"{arr.dtype.name} with {arr.size}; the update is truncated or corrupt"
            )
        flat[key] = arr
    extra = sorted(set(payload) - set(need))
    if extra:
        raise FederationError(
            f"decompress {kind!r}: arrays {extra[:3]} are not in the update's index"
        )
    return flat


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
    "INDEX_KEYS",
    "KINDS",
    "PACKED_PREFIX",
    "RELATIVE_ERROR_BOUND",
    "bfloat16_bits_to_float32",
    "compress",
    "compression_ratio",
    "decompress",
    "float32_to_bfloat16_bits",
    "packed_key",
    "payload_bytes",
    "uses_deltas",
]
