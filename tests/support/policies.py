"""Site policies for tests: a permissive base and the strict default, written as real YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PERMISSIVE: dict[str, Any] = {
    "version": 1,
    "privacy": {"dp_required": False, "min_noise_multiplier": None, "max_clipping_norm": None,
                "lifetime_epsilon": None},
    "secure_aggregation": {"required": False, "min_participants": 2},
    "training": {
        "allowed_strategies": ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian",
                               "fedtrimmedavg", "fedbn"],
        "max_rounds": None, "max_local_epochs": None,
    },
    "reporting": {"min_cases_per_metric": 1, "decimals": 4, "training_loss": "always"},
}


def write_policy(path: Path, **sections: dict[str, Any]) -> Path:
    """A policy file: :data:`PERMISSIVE` with ``sections`` merged into its sections."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PERMISSIVE.items()}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
