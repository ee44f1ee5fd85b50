"""A minimal but complete site fingerprint, for tests that plan the target spacing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmed.data.fingerprint import FINGERPRINT_KEYS, FINGERPRINT_NAME


def stub_fingerprint(site: str, median_spacing: Sequence[float] | None) -> dict[str, Any]:
    """A fingerprint with every key of :data:`FINGERPRINT_KEYS` and this median spacing."""
    fp: dict[str, Any] = {key: None for key in FINGERPRINT_KEYS}
    fp.update(site=site, format="folder", num_cases=1, num_valid=1, modalities=["T1"])
    fp["median_spacing"] = None if median_spacing is None else list(median_spacing)
    return fp


def write_stub_fingerprint(site_dir: Path, median_spacing: Sequence[float] | None) -> Path:
    """Write :func:`stub_fingerprint` as ``site_dir/fingerprint.json``."""
    site_dir.mkdir(parents=True, exist_ok=True)
    path = site_dir / FINGERPRINT_NAME
    path.write_text(json.dumps(stub_fingerprint(site_dir.name, median_spacing)))
    return path
