"""The site policy file: read, explain, create, and approve app bundles in it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedmed.config import validation_lines
from fedmed.errors import PolicyError
from fedmed.policy.model import FAB_HASH_PATTERN, ApprovedApp, SitePolicy

FAB_HASH = re.compile(FAB_HASH_PATTERN)


def _validate(data: Mapping[str, Any], source: str) -> SitePolicy:
    try:
        return SitePolicy.model_validate(dict(data))
    except ValidationError as exc:
        raise PolicyError(
            f"invalid site policy {source}:\n{validation_lines(exc)}"
            "\n(`fedmed site policy init --out FILE` writes a commented default)"
        ) from None


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PolicyError(
            f"site policy {path} does not exist; create one with "
            f"`fedmed site policy init --out {path}` and review it"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"site policy {path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"site policy {path} must be a mapping, got {type(raw).__name__}")
    return raw


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy.

    Raises:
        PolicyError: missing file, not YAML, unknown keys or bad values (each named).
    """
    p = Path(path).expanduser()
    return _validate(_read_mapping(p), source=str(p))


def policy_sources(path: str | Path) -> Iterator[tuple[str, Any, str]]:
    """Every setting in force as ``(dotted key, value, where it came from)``.

    ``where`` is the file for keys it sets and ``default`` for the rest.
    """
    p = Path(path).expanduser()
    raw = _read_mapping(p)
    policy = _validate(raw, source=str(p))
    data = policy.model_dump(mode="json")
    for section, value in data.items():
        if isinstance(value, dict):
            given = raw.get(section) or {}
            for key, v in value.items():
                yield f"{section}.{key}", v, str(p) if key in given else "default"
        else:
            yield section, value, str(p) if section in raw else "default"


def default_policy_text(site: str | None = None) -> str:
    """The strict, commented default policy that ``fedmed site policy init`` writes."""
    name = site or "null"
    return f"""\
# fedmed site policy: what this hospital's installation does, whatever the coordinator asks.
# Owned by the hospital (its data protection officer); the coordinator cannot change it.
# Every request is checked against it before any data is read; what it forbids is refused
# with a reason code. Unknown keys are errors. See docs/site-policy.md.
version: 1
site: {name}                        # a label for logs and `fedmed site policy show`

privacy:
  dp_required: true                 # refuse training without patient-level DP-SGD
  min_noise_multiplier: 0.8         # floor on sigma (requested or computed from target epsilon)
  max_delta: 1.0e-5                 # ceiling on delta
  max_clipping_norm: 1.0            # ceiling on the per-patient clipping norm
  lifetime_epsilon: 10.0            # cap on epsilon over every run that used this dataset
  dataset_id: null                  # null: a hash of the case list (new cases: new dataset)

secure_aggregation:
  required: true                    # updates leave only masked (Flower SecAgg+)
  min_participants: 3               # fewest sites in a secure sum

training:
  allowed_strategies: [fedavg, fedprox]
  allowed_architectures: [unet, fusion]
  max_rounds: 200                   # per run
  max_local_epochs: 5               # per round

reporting:
  min_cases_per_metric: 10          # k: no metric over fewer cases leaves the site
  decimals: 2                       # metrics are rounded before they leave
  training_loss: without_dp         # always | without_dp | never

data:
  val_fraction: 0.15                # the site's own split, drawn once and kept in state-dir
  test_fraction: 0.2
  split_seed: 0
  max_image_megavoxels: 64          # images claiming more voxels are refused before reading

# Flower app bundles (by SHA-256) allowed to run next to the data; add with
# `fedmed site approve FAB_FILE_OR_HASH --policy THIS_FILE --by NAME`.
approved_apps: []
"""


def write_default_policy(path: str | Path, *, site: str | None = None, force: bool = False) -> Path:
    """Write :func:`default_policy_text` to ``path``.

    Raises:
        PolicyError: the file exists and ``force`` is not set.
    """
    p = Path(path).expanduser()
    if p.exists() and not force:
        raise PolicyError(f"{p} already exists; pass --force to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(default_policy_text(site))
    _validate(yaml.safe_load(p.read_text()), source=str(p))
    return p


def fab_hash_of(value: str | Path) -> str:
    """The SHA-256 hash of a ``.fab`` file, or ``value`` itself when it is already a hash.

    Raises:
        PolicyError: neither an existing file nor 64 hex digits.
    """
    text = str(value).strip()
    if FAB_HASH.match(text.lower()) and not Path(text).is_file():
        return text.lower()
    p = Path(text).expanduser()
    if not p.is_file():
        raise PolicyError(
            f"{text!r} is neither a Flower app bundle (.fab file) nor a SHA-256 hash "
            "(64 hex digits); build the bundle with `flwr build` or copy the hash from it"
        )
    return hashlib.sha256(p.read_bytes()).hexdigest()


def approve_app(
    policy_path: str | Path, fab_hash: str, approved_by: str, note: str = ""
) -> SitePolicy:
    """Add an approved app bundle to the policy file (kept: the file's other text).

    Raises:
        PolicyError: the policy is invalid, the hash malformed, or already approved.
    """
    p = Path(policy_path).expanduser()
    policy = load_policy(p)
    h = fab_hash.lower()
    entry = ApprovedApp(
        fab_hash=h, approved_by=approved_by, note=note,
        approved_at=datetime.now(UTC).replace(microsecond=0).isoformat(),
    ) if FAB_HASH.match(h) else None
    if entry is None:
        raise PolicyError(f"fab hash must be 64 hex digits (SHA-256), got {fab_hash!r}")
    if policy.is_approved(h):
        raise PolicyError(f"{p}: app {h} is already approved")
    line = "  - " + yaml.safe_dump(entry.model_dump(), default_flow_style=True, width=400).strip()
    text = p.read_text()
    if re.search(r"^approved_apps:\s*\[\]\s*$", text, flags=re.M):
        text = re.sub(r"^approved_apps:\s*\[\]\s*$", "approved_apps:\n" + line, text, flags=re.M)
    elif re.search(r"^approved_apps:\s*$", text, flags=re.M) and _last_key(text) == "approved_apps":
        text = text.rstrip("\n") + "\n" + line + "\n"
    else:
        data = _read_mapping(p)
        data["approved_apps"] = [*data.get("approved_apps", []), entry.model_dump()]
        text = yaml.safe_dump(data, sort_keys=False)
    updated = _validate(yaml.safe_load(text), source=str(p))
    p.write_text(text if text.endswith("\n") else text + "\n")
    return updated


def _last_key(text: str) -> str | None:
    keys = re.findall(r"^([A-Za-z_][A-Za-z0-9_]*):", text, flags=re.M)
    return keys[-1] if keys else None
