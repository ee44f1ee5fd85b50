"""What a site keeps between rounds and runs, in its state folder (no Flower types).

- The global weights it last received for training in each run
  (``<state-dir>/runs/<run>/global.json``: their SHA-256), so it evaluates only a global
  model of that run (:func:`remember_global`, :func:`is_last_global`).
- FedBN: the site's own normalisation tensors after each round (``<state-dir>/fedbn``), so a
  restarted site continues with its own layers (:mod:`fedmed.federation.fedbn` explains
  FedBN).
- Ditto: the site's personal model after each round (``<state-dir>/runs/<run>/ditto``), so a
  restarted site continues it (:mod:`fedmed.federation.personal` explains Ditto).

Per-round files (the last two kept, written atomically) make a round that is re-run after a
coordinator restart start from the round before it, not from its own result.

The site's fixed data split and its lifetime privacy ledger live in the same folder,
written by :mod:`fedmed.data.dataset` and :mod:`fedmed.training.ledger`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

RUNS_DIR = "runs"
_GLOBAL_FILE = "global.json"


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        arr = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _run_dir(state_dir: Path, run_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)[:120] or "run"
    return Path(state_dir) / RUNS_DIR / safe


def run_state_dir(state_dir: Path, run_name: str) -> Path:
    """``<state-dir>/runs/<run>``: what belongs to one run (FedBN norms, last global; made)."""
    d = _run_dir(state_dir, run_name)
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a crash leaves the old file or the new)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: Path) -> object | None:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def remember_global(state_dir: Path, run_name: str, server_round: int, digest: str) -> None:
    """Record the global weights a train request of ``run_name`` brought (atomic)."""
    path = run_state_dir(state_dir, run_name) / _GLOBAL_FILE
    write_json(path, {"round": int(server_round), "sha256": digest})


def is_last_global(state_dir: Path, run_name: str, digest: str) -> bool:
    """Whether ``digest`` is that of the last global weights received for training."""
    saved = read_json(_run_dir(state_dir, run_name) / _GLOBAL_FILE)
    return isinstance(saved, dict) and saved.get("sha256") == digest


FEDBN_DIR = "fedbn"
DITTO_DIR = "ditto"


def split_norm(
    weights: Mapping[str, np.ndarray], norm_keys: Collection[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(shared, norm)``: the weights split by whether their name is a normalisation key."""
    shared = {k: v for k, v in weights.items() if k not in norm_keys}
    norm = {k: v for k, v in weights.items() if k in norm_keys}
    return shared, norm


def _save_round(d: Path, stem: str, server_round: int,
                arrays: Mapping[str, np.ndarray]) -> Path:
    """``<d>/<stem>-roundNNNNN.npz`` (atomic); only the last two rounds are kept."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stem}-round{server_round:05d}.npz"
    tmp = d / f".{stem}-round{server_round:05d}.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    tmp.replace(path)
    for r in sorted(_rounds(d, stem))[:-2]:
        (d / f"{stem}-round{r:05d}.npz").unlink(missing_ok=True)
    return path


def _rounds(d: Path, stem: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(stem)}-round(\d+)\.npz$")
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = pattern.match(p.name)
            if m:
                out.append(int(m.group(1)))
    return out


def _load_round(d: Path, stem: str, before_round: int) -> dict[str, np.ndarray] | None:
    """The arrays of the latest round before ``before_round`` in ``d``, if any."""
    rounds = [r for r in _rounds(d, stem) if r < before_round]
    if not rounds:
        return None
    with np.load(d / f"{stem}-round{max(rounds):05d}.npz") as data:
        return {k: data[k] for k in data.files}


def save_site_norm(state_dir: Path, server_round: int, norm: Mapping[str, np.ndarray]) -> Path:
    """Store a site's normalisation tensors after ``server_round`` (atomic; keeps the last 2).

    Per-round files make a resumed round reproducible: a round that is re-run after a
    coordinator restart starts from the tensors of the round before it, not its own.
    """
    return _save_round(state_dir / FEDBN_DIR, "norm", server_round, norm)


def load_site_norm(state_dir: Path, before_round: int) -> dict[str, np.ndarray] | None:
    """The site's normalisation tensors of the latest round before ``before_round``, if any."""
    return _load_round(state_dir / FEDBN_DIR, "norm", before_round)


def save_personal(state_dir: Path, server_round: int, weights: Mapping[str, np.ndarray]) -> Path:
    """Store a site's Ditto personal model after ``server_round`` in a run's state folder."""
    return _save_round(state_dir / DITTO_DIR, "personal", server_round, weights)


def load_personal(state_dir: Path, before_round: int) -> dict[str, np.ndarray] | None:
    """The site's personal model of the latest round before ``before_round``, if any."""
    return _load_round(state_dir / DITTO_DIR, "personal", before_round)


__all__ = [
    "is_last_global",
    "load_personal",
    "load_site_norm",
    "read_json",
    "remember_global",
    "run_state_dir",
    "save_personal",
    "save_site_norm",
    "split_norm",
    "weights_digest",
    "write_json",
]
