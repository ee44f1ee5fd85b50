"""``model.pt``: weights plus everything needed to rebuild the network and preprocess input.

A checkpoint holds the model's state dict, the full federation config it was trained with
(model, preprocessing, labels, modalities) and the preprocessing settings actually used
(target spacing included, even when it was planned from fingerprints), so that
``fedmed predict`` needs nothing but the file.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fedmed
from fedmed.config import FederationConfig, config_from_dict
from fedmed.errors import CheckpointError

FORMAT = "fedmed-model/1"


@dataclass(frozen=True)
class LoadedModel:
    """A network rebuilt from ``model.pt`` with its config and preprocessing settings."""

    model: nn.Module
    cfg: FederationConfig
    target_spacing: tuple[float, float, float]
    extra: dict[str, Any]


def save_model(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    cfg: FederationConfig,
    target_spacing: tuple[float, float, float],
    **extra: Any,
) -> Path:
    """Write ``model.pt`` (atomically: a killed process never leaves half a file)."""
    payload = {
        "format": FORMAT,
        "fedmed_version": fedmed.__version__,
        "weights": {k: v.detach().cpu() for k, v in weights.items()},
        "config": cfg.model_dump(mode="json"),
        "target_spacing": [float(s) for s in target_spacing],
        "extra": extra,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a ``model.pt``.

    Raises:
        CheckpointError: missing file, not a fedmed checkpoint, or weights that do not fit.
    """
    from fedmed.models import build_model

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: model file does not exist (expected RUN/model.pt)")
    payload = _load_payload(p, device)
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg.model, cfg.modalities, cfg.num_classes)
    try:
        model.load_state_dict(payload["weights"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{p}: weights do not fit the model its config builds: {exc}"
        ) from None
    return LoadedModel(
        model=model.to(device).eval(),
        cfg=cfg,
        target_spacing=_spacing(p, payload["target_spacing"]),
        extra=dict(payload.get("extra") or {}),
    )


def _load_payload(p: Path, device: str | torch.device) -> dict[str, Any]:
    """The checkpoint's payload, unpickled with ``weights_only=True``.

    A model file may come from elsewhere (hospitals load what the coordinator sends), so
    only tensors and plain containers are unpickled: a pickle that would construct other
    objects or run code is refused without running it.
    """
    try:
        payload = torch.load(p, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the refused global or opcode on one line of its long message.
        found = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "operand" in ln]
        raise CheckpointError(
            f"{p}: refused to load: not a weights-only PyTorch checkpoint "
            f"({found[0] if found else 'unreadable pickle'}). Model files are read with "
            "torch.load(weights_only=True), which builds only tensors, numbers, strings and "
            "containers, so nothing in this file ran; use a model.pt written by fedmed"
        ) from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{p}: cannot read checkpoint ({type(exc).__name__}: {reason}); expected a "
            "model.pt written by fedmed (a run's RUN/model.pt)"
        ) from None
    keys = ("format", "config", "weights", "target_spacing")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a fedmed model checkpoint (format {FORMAT!r})")
    missing = [k for k in keys if k not in payload]
    if missing or not isinstance(payload["weights"], dict):
        raise CheckpointError(
            f"{p}: damaged fedmed checkpoint (missing or malformed {missing or ['weights']}); "
            "use the run's model.pt as fedmed wrote it"
        )
    return payload


def _spacing(p: Path, value: Any) -> tuple[float, float, float]:
    """The checkpoint's target spacing, as three positive millimetre values."""
    try:
        sx, sy, sz = (float(v) for v in value)
    except (TypeError, ValueError):
        sx = sy = sz = float("nan")
    if not all(math.isfinite(s) and s > 0 for s in (sx, sy, sz)):
        raise CheckpointError(
            f"{p}: target_spacing must be three positive numbers (mm), got {value!r}; "
            "the checkpoint is damaged: use the run's model.pt as fedmed wrote it"
        )
    return sx, sy, sz
