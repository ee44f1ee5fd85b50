"""``fedmed compare`` reuses a finished arm whose inputs have not changed.

An *arm* is one approach of a comparison: the centralized baseline, one site's local-only
baseline, one federated strategy, the DP run. When an arm finishes, its run folder gets
``reuse.json``: the sha256 of the arm's inputs and the inputs themselves --

- the parts of the resolved config that matter for the arm (``tracking`` never does; the
  ``federation``, ``secure_aggregation`` and ``compression`` sections only for federated
  arms; ``privacy`` only where DP is on somewhere);
- the arm's arguments (sites pooled, strategy, rounds x local epochs, epochs);
- the data: every site's, the central test set's and each unseen site's manifest (each
  file's path, size and modification time -- no voxel is read), each site's fixed split
  and policy, and the planned preprocessing settings;
- the fedmed version.

The next ``fedmed compare`` into the same folder recomputes the inputs (cheap) and reuses
the arm's ``summary.json`` when the sha256 matches; otherwise it retrains the arm and says
what changed. ``--rerun`` retrains every requested arm regardless.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedmed
from fedmed.config import FederationConfig
from fedmed.errors import FederationError

REUSE_FILE = "reuse.json"
"""In an arm's run folder: what it was trained from (sha256 and inputs)."""
MARKER_FILE = ".fedmed-comparison"
"""In a comparison folder: marks it as one (so a second ``compare`` may write into it)."""
_FEDERATED_ONLY = ("federation", "secure_aggregation", "compression")


def _private(cfg: FederationConfig) -> bool:
    return cfg.privacy.enabled or any(cfg.privacy_for(s).enabled for s in cfg.site_names)


def config_part(cfg: FederationConfig, kind: str) -> dict[str, Any]:
    """The parts of ``cfg`` that decide an arm's result (JSON-ready).

    Args:
        cfg: the arm's config (matched compute applied).
        kind: ``centralized``, ``local`` or ``federated``.
    """
    data = cfg.model_dump(mode="json")
    for key in ("tracking", "root"):
        data.pop(key, None)
    if kind != "federated":
        for key in _FEDERATED_ONLY:
            data.pop(key, None)
    if not _private(cfg):
        data.pop("privacy", None)
        for site in data.get("sites", []):
            site.pop("privacy", None)
    return data


def _file_stats(path: Path, root: Path) -> list[Any]:
    """``[relative path, size, mtime_ns]`` of a file, or of every file in a folder (DICOM)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out: list[Any] = []
    for f in files:
        st = f.stat()
        try:
            rel = str(f.relative_to(root))
        except ValueError:
            rel = str(f)
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def manifest_fingerprint(
    root: Path, modalities: Sequence[str], name: str | None = None
) -> dict[str, Any]:
    """A folder's cases as the manifest lists them: files, sizes, modification times.

    Raises:
        DatasetFormatError: the folder is not a supported layout.
    """
    from fedmed.data.formats import load_site

    manifest = load_site(root, expected_modalities=modalities, name=name)
    cases = []
    for case in manifest.cases:
        files = {m: [mf.channel, _file_stats(mf.path, manifest.root)]
                 for m, mf in sorted(case.images.items())}
        label = None if case.label is None else _file_stats(case.label, manifest.root)
        cases.append([case.case_id, files, label])
    return {"folder": str(manifest.root), "format": manifest.format,
            "labels": {str(k): v for k, v in manifest.labels.items()}, "cases": cases}


def data_fingerprint(cfg: FederationConfig) -> dict[str, Any]:
    """Every input folder of a comparison, without reading a voxel.

    Each site: its manifest, its fixed split (``split.json`` in its state folder) and its
    policy file (``sites[].policy``); the central test set and each unseen site: its
    manifest; and the planned preprocessing settings (the target spacing may come from the
    sites' fingerprints).

    Raises:
        FedMedError: a folder is not a supported layout, or planning fails.
    """
    from fedmed.data.dataset import SiteSplit, site_split_ids
    from fedmed.data.planning import plan_preprocessing
    from fedmed.policy.simulation import site_policy_for

    sites = {}
    for name in cfg.site_names:
        sites[name] = {
            "manifest": manifest_fingerprint(cfg.site_dir(name), cfg.modalities, name),
            "split": site_split_ids(cfg, name, fixed=SiteSplit.simulated(cfg, name)),
            # a named policy file; without one the policy follows the config (its key)
            "policy": (site_policy_for(cfg, name).model_dump(mode="json")
                       if cfg.site(name).policy is not None else None),
        }
    central = None
    if cfg.central_test is not None:
        central = manifest_fingerprint(cfg.resolve(cfg.central_test), cfg.modalities)
    unseen = {str(p): manifest_fingerprint(cfg.resolve(p), cfg.modalities)
              for p in cfg.unseen_sites}
    return {"sites": sites, "central_test": central, "unseen": unseen,
            "preprocessing": plan_preprocessing(cfg).as_dict()}


@dataclass(frozen=True)
class ArmKey:
    """What an arm was (or would be) trained from.

    Attributes:
        sha256: hex digest of the canonical JSON of ``inputs``.
        inputs: ``arm``, ``kind``, ``arguments``, ``config``, ``data``, ``fedmed_version``.
    """

    sha256: str
    inputs: dict[str, Any]

    @classmethod
    def of(
        cls, name: str, kind: str, cfg: FederationConfig, arguments: Mapping[str, Any],
        data: Mapping[str, Any],
    ) -> ArmKey:
        """The key of arm ``name`` (``kind``: centralized, local, federated)."""
        inputs = {
            "arm": name, "kind": kind, "arguments": dict(arguments),
            "config": config_part(cfg, kind), "data": dict(data),
            "fedmed_version": fedmed.__version__,
        }
        canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
        inputs = json.loads(canonical)  # exactly what was hashed
        return cls(hashlib.sha256(canonical.encode()).hexdigest(), inputs)

    def write(self, run: Path) -> None:
        """Write ``run/reuse.json`` (after the arm finished)."""
        text = json.dumps({"sha256": self.sha256, "inputs": self.inputs}, indent=1)
        tmp = run / f".{REUSE_FILE}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(run / REUSE_FILE)


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two arms' inputs, in words (``config.training``, ...)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in ("config", "data") and isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(key.replace("_", " "))
    return out


def why_not_reusable(run: Path, key: ArmKey) -> str | None:
    """``None`` when the finished arm in ``run`` can be reused for ``key``, else why not."""
    path = run / REUSE_FILE
    if not path.is_file():
        if not (run / "summary.json").is_file():
            return "not run yet"
        return f"no {REUSE_FILE} (trained before reuse existed, or by another command)"
    if not (run / "summary.json").is_file():
        return "the run did not finish"
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        return f"{path} is unreadable"
    if stored.get("sha256") == key.sha256:
        return None
    diff = changed(stored.get("inputs") or {}, key.inputs)
    return "changed: " + (", ".join(diff) if diff else "inputs")


def prepare_folder(out: Path, *, force: bool) -> None:
    """Make ``out`` a comparison folder (creating it and its marker).

    A folder that already holds a comparison (its marker, or ``comparison.json``) is taken
    as it is: arms are reused or retrained inside it.

    Raises:
        FederationError: ``out`` holds other files and ``force`` is not given.
    """
    marker = out / MARKER_FILE
    foreign = (out.exists() and any(out.iterdir()) and not marker.is_file()
               and not (out / "comparison.json").is_file())
    if foreign and not force:
        raise FederationError(
            f"{out} already holds files that are not a fedmed comparison; choose another "
            "--out, or pass --force to write the comparison into it"
        )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("a fedmed compare folder: arms here are reused when unchanged\n")
