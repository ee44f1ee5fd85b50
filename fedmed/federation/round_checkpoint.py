"""The coordinator's checkpoint: the state after a finished round, so a run can resume.

``RUN/checkpoint.pt`` holds the global weights, the strategy's accumulated state (FedAdam's
moments), the round, the metrics history and the wall time so far. It is written atomically
after every round and read with ``torch.load(weights_only=True)``: tensors, numbers and
strings only, nothing that unpickles code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.errors import CheckpointError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "fedmed-coordinator/1"


@dataclass(frozen=True)
class RoundState:
    """What a finished round leaves for the next one.

    Attributes:
        round: the last finished round.
        arrays: the global weights after it.
        strategy_state: the strategy's accumulated state (attribute -> name -> array).
        history: the metrics lines of the finished rounds.
        wall_seconds: the run's wall time so far.
    """

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]]
    history: list[dict[str, Any]]
    wall_seconds: float


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def save_round_state(path: Path, state: RoundState, *, strategy: str, model_json: str) -> None:
    """Write ``state`` to ``path`` atomically (tmp file + rename).

    Args:
        path: ``RUN/checkpoint.pt``.
        state: the state after the round.
        strategy: the strategy's config name (checked on resume).
        model_json: the model config as JSON (checked on resume).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "round": state.round,
        "strategy": strategy,
        "arrays": _tensors(state.arrays),
        "strategy_state": {a: _tensors(v) for a, v in state.strategy_state.items()},
        "history": json.dumps(state.history),
        "wall_seconds": float(state.wall_seconds),
        "model": model_json,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_round_state(path: Path, *, strategy: str, model_json: str) -> RoundState | None:
    """The state an earlier run of this folder left, checked against the current config.

    Returns:
        ``None`` when there is no checkpoint.

    Raises:
        CheckpointError: unreadable, or written with another strategy or model.
    """
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read the coordinator checkpoint ({type(exc).__name__}: {exc}); "
            "delete it (and metrics.jsonl) to start over, or use --force"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a fedmed coordinator checkpoint")
    if payload["strategy"] != strategy:
        raise CheckpointError(
            f"--resume: {path} was written by strategy {payload['strategy']!r}, the config "
            f"asks for {strategy!r}; resume with --strategy {payload['strategy']}"
        )
    if json.loads(payload["model"]) != json.loads(model_json):
        raise CheckpointError(
            f"--resume: {path} holds a model built with another model config; resume with "
            "the config the run started with (RUN/config.yaml)"
        )
    return RoundState(
        round=int(payload["round"]),
        arrays={k: v.numpy() for k, v in payload["arrays"].items()},
        strategy_state={
            a: {k: t.numpy() for k, t in v.items()} for a, v in payload["strategy_state"].items()
        },
        history=list(json.loads(payload["history"])),
        wall_seconds=float(payload["wall_seconds"]),
    )


__all__ = ["CHECKPOINT_FILE", "RoundState", "load_round_state", "save_round_state"]
