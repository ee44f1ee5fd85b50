"""``model.pt``: weights plus everything needed to rebuild the network and preprocess input.

A checkpoint holds the model's state dict, the full federation config it was trained with
(model, preprocessing, labels, modalities) and the preprocessing settings actually used
(target spacing included, even when it was planned from fingerprints), so that
``fedmed predict`` needs nothing but the file.
"""

from __future__ import annotations

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
    try:
        payload = torch.load(p, map_location=device, weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"{p}: cannot read checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a fedmed model checkpoint (format {FORMAT!r})")
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    try:
        model.load_state_dict(payload["weights"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{p}: weights do not fit the model its config builds: {exc}"
        ) from None
    spacing = payload["target_spacing"]
    return LoadedModel(
        model=model.to(device).eval(),
        cfg=cfg,
        target_spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        extra=dict(payload.get("extra", {})),
    )
