"""What a bundle says about itself: ``configs/metadata.json`` and ``docs/README.md``.

The metadata follows MONAI's bundle schema (:mod:`fedmed.export.schema`) and adds a ``fedmed``
section: the federation that trained the model (sites, rounds, strategy, DP epsilon per site),
its evaluation and, when the run folder or its parent holds ``comparison.json``, the
centralized / local / federated comparison. Names only, never paths: a bundle travels.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from fedmed.errors import ExportError
from fedmed.export.schema import META_SCHEMA_URL
from fedmed.training.checkpoint import LoadedModel

BUNDLE_VERSION = "0.1.0"
COMPARISON_FILE = "comparison.json"
SUMMARY_FILE = "summary.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc}); re-create it or remove it") from None
    return data if isinstance(data, dict) else None


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _dice(entry: Any) -> float | None:
    return entry.get("dice_mean") if isinstance(entry, Mapping) else None


def comparison_record(run_dir: Path) -> dict[str, Any] | None:
    """Headline figures of the ``comparison.json`` in ``run_dir`` or its parent, if any.

    Returns:
        ``centralized_dice``, ``local_dice`` (per site), ``local_mean_dice``,
        ``federated_dice`` (per approach), ``ratio_federated_to_centralized``, the compute
        rule's ``epochs`` / ``rounds``, and ``this_run`` (the approach this run folder is,
        when it sits inside the comparison folder); ``None`` without a comparison.
    """
    for folder, inside in ((run_dir, False), (run_dir.parent, True)):
        data = _read_json(folder / COMPARISON_FILE)
        if data is None:
            continue
        record: dict[str, Any] = {
            "centralized_dice": _dice(data.get("centralized")),
            "local_dice": {s: _dice(v) for s, v in (data.get("local") or {}).items()},
            "local_mean_dice": data.get("local_mean_dice"),
            "federated_dice": {n: _dice(v) for n, v in (data.get("federated") or {}).items()},
            "ratio_federated_to_centralized": data.get("ratio_federated_to_centralized", {}),
            "epochs": data.get("epochs"),
            "rounds": data.get("rounds"),
        }
        if inside:
            record["this_run"] = run_dir.name
        return record
    return None


def federation_record(loaded: LoadedModel, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Who trained the model and how: mode, sites, rounds, strategy, DP budget per site."""
    cfg = loaded.cfg
    mode = summary.get("mode") or loaded.extra.get("mode") or "unknown"
    record: dict[str, Any] = {
        "mode": mode,
        "sites": list(summary.get("sites") or cfg.site_names),
    }
    if mode == "federated":
        record["strategy"] = summary.get("strategy") or loaded.extra.get("strategy")
        record["rounds"] = summary.get("rounds") or loaded.extra.get("rounds")
        record["local_epochs"] = cfg.federation.local_epochs
        record["secure_aggregation"] = bool(summary.get("secure_aggregation", False))
    else:
        record["epochs"] = summary.get("epochs", cfg.training.epochs)
    epsilon = summary.get("epsilon")
    dp_enabled = bool(epsilon) or cfg.privacy.enabled
    record["differential_privacy"] = {
        "enabled": dp_enabled,
        "unit": "patient (case)",
        "epsilon": dict(epsilon or {}),
        "delta": summary.get("delta", cfg.privacy.delta) if dp_enabled else None,
    }
    return record


def evaluation_record(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run's evaluation on its test cases, as MONAI's ``eval_metrics``."""
    metrics: dict[str, Any] = {}
    if summary.get("dice_mean") is not None:
        metrics["mean_dice"] = summary["dice_mean"]
    for name, value in (summary.get("dice_per_class") or {}).items():
        metrics[f"dice_{name}"] = value
    if summary.get("hd95_mean") is not None:
        metrics["mean_hd95_mm"] = summary["hd95_mean"]
    return metrics


def _tensor_format(
    num_channels: int, channel_def: Mapping[str, str], divisor: int, fmt: str
) -> dict[str, Any]:
    return {
        "type": "image",
        "format": fmt,
        "num_channels": num_channels,
        "spatial_shape": [f"{divisor}*n"] * 3,
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": True,
        "channel_def": dict(channel_def),
    }


def _classes(names: Mapping[int, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(names.items()))


def build_metadata(loaded: LoadedModel, run_dir: Path, divisor: int) -> dict[str, Any]:
    """``configs/metadata.json`` of the bundle exported from ``run_dir``.

    Args:
        loaded: the run's model (``RUN/model.pt``).
        run_dir: the run folder (``summary.json``; ``comparison.json`` here or one level up).
        divisor: the network's total down-sampling (input sizes are multiples of it).
    """
    import monai
    import numpy
    import torch

    import fedmed

    cfg = loaded.cfg
    summary = _read_json(run_dir / SUMMARY_FILE) or {}
    kinds = {m: cfg.preprocessing.normalization.get(m) for m in cfg.modalities}
    scan_kind = {
        m: "CT" if n is not None and n.kind == "ct_window" else "MR" for m, n in kinds.items()
    }
    inputs = {str(c): m for c, m in enumerate(cfg.modalities)}
    labels = {int(k): str(v) for k, v in cfg.labels.items()}
    federation = federation_record(loaded, summary)
    sites = ", ".join(federation["sites"]) or "unknown"
    meta: dict[str, Any] = {
        "schema": META_SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {
            BUNDLE_VERSION: f"exported by fedmed {fedmed.__version__} from {run_dir.name}"
        },
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {
            "fedmed": fedmed.__version__,
            "nibabel": _version("nibabel"),
            "SimpleITK": _version("SimpleITK"),
            "scipy": _version("scipy"),
        },
        "name": f"fedmed {cfg.name}",
        "task": (
            f"3D segmentation of {', '.join(labels[k] for k in sorted(labels) if k)} from "
            f"{', '.join(cfg.modalities)} ({'/'.join(sorted(set(scan_kind.values())))})"
        ),
        "description": (
            f"A {cfg.model.architecture} network trained with fedmed ({federation['mode']}, "
            f"sites: {sites}). Preprocessing, sliding-window inference and the export back to "
            "the input's geometry are those of `fedmed predict`."
        ),
        "authors": f"fedmed federation {cfg.name!r} (sites: {sites})",
        "copyright": f"the members of the federation {cfg.name!r}",
        "data_source": f"the sites' own scans, never shared (sites: {sites})",
        "data_type": "nibabel",
        "image_classes": _classes(dict(enumerate(cfg.modalities))),
        "label_classes": _classes(labels),
        "pred_classes": _classes(labels),
        "eval_metrics": evaluation_record(summary),
        "intended_use": "Research only; not a medical device and not for clinical decisions.",
        "references": [],
        "network_data_format": {
            "inputs": {"image": _tensor_format(len(inputs), inputs, divisor, "magnitude")},
            "outputs": {
                "pred": _tensor_format(
                    len(labels), {str(k): v for k, v in labels.items()}, divisor, "segmentation"
                )
            },
        },
        "fedmed": _fedmed_section(loaded, run_dir, summary, federation, scan_kind),
    }
    return meta


def _fedmed_section(
    loaded: LoadedModel,
    run_dir: Path,
    summary: Mapping[str, Any],
    federation: dict[str, Any],
    scan_kind: Mapping[str, str],
) -> dict[str, Any]:
    """The metadata's ``fedmed`` section: labels, preprocessing, federation, comparison."""
    import fedmed

    cfg = loaded.cfg
    return {
        "fedmed_version": fedmed.__version__,
        "python_version": platform.python_version(),
        "run": run_dir.name,
        "modalities": list(cfg.modalities),
        "modality_kinds": dict(scan_kind),
        "labels": {str(k): str(v) for k, v in cfg.labels.items()},
        "target_spacing": list(loaded.target_spacing),
        "federation": federation,
        "evaluation": {k: summary.get(k) for k in ("dice_mean", "dice_per_class", "hd95_mean")},
        "comparison": comparison_record(run_dir),
    }


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _federation_lines(fed_meta: Mapping[str, Any]) -> list[str]:
    fed = fed_meta["federation"]
    lines = [f"- mode: {fed['mode']}; sites: {', '.join(fed['sites']) or '-'}"]
    if fed["mode"] == "federated":
        lines.append(
            f"- strategy: {fed.get('strategy')}, {fed.get('rounds')} rounds x "
            f"{fed.get('local_epochs')} local epochs"
        )
    dp = fed["differential_privacy"]
    if dp["enabled"]:
        eps = ", ".join(f"{s}: {_figure(e)}" for s, e in dp["epsilon"].items()) or "-"
        lines.append(f"- differential privacy (per patient): epsilon {eps}; delta {dp['delta']}")
    else:
        lines.append("- differential privacy: off")
    ev = fed_meta["evaluation"]
    lines.append(f"- test Dice (mean): {_figure(ev.get('dice_mean'))}")
    for name, value in (ev.get("dice_per_class") or {}).items():
        lines.append(f"  - {name}: {_figure(value)}")
    cmp = fed_meta.get("comparison")
    if cmp:
        lines.append(
            f"- comparison: centralized {_figure(cmp['centralized_dice'])}, local-only mean "
            f"{_figure(cmp['local_mean_dice'])}, federated "
            + ", ".join(f"{k} {_figure(v)}" for k, v in cmp["federated_dice"].items())
        )
    return lines


def render_readme(meta: Mapping[str, Any], inference: Mapping[str, Any]) -> str:
    """``docs/README.md``: what the model is, how to run it, what it needs."""
    fm = meta["fedmed"]
    mods = fm["modalities"]
    item = ", ".join(f"'{m}': '/data/case1_{m.lower()}.nii.gz'" for m in mods)
    labels = ", ".join(f"{k} = {v}" for k, v in fm["labels"].items())
    return f"""# {meta["name"]}

{meta["description"]}

**{meta["intended_use"]}**

## Input and output

- input: one 3D scan per modality, in this channel order: {", ".join(mods)}
  (NIfTI, NRRD, MHA or a DICOM series folder; any orientation and voxel size).
- output: one label map per case, `<output_dir>/<case_id>.nii.gz`, with the input scan's exact
  shape and affine (the first given modality's). Labels: {labels}.
- preprocessing (fedmed's own, in `fedmed.export.steps.LoadPreprocessd`): reorientation to
  {inference["preprocessing_settings"]["orientation"]}, resampling to
  {fm["target_spacing"]} mm, foreground crop, per-modality normalisation; then MONAI's
  sliding-window inference (`inferer`) and resampling of the class probabilities back onto the
  input's grid (`fedmed.export.steps.ToReferenceGridd`).

## Requirements

fedmed must be installed: the configs name fedmed's preprocessing and network by `_target_`
(`fedmed.export.steps`). Install the exporting version, `pip install fedmed=={fm["fedmed_version"]}`
(or the fedmed repository: `pip install -e .`), which brings MONAI {meta["monai_version"]} and
PyTorch. Nothing is downloaded at run time.

## Run with MONAI's bundle runner

Every case of a site folder (any layout `fedmed data check` reads):

```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
    --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE \\
    --dataset_dir /data/site --output_dir /data/masks
```

Chosen files (one entry per case; a single 4D file with every modality as a channel may be
given as `'image'`):

```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
    --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE \\
    --datalist "[{{{item}, 'case_id': 'case1'}}]" --output_dir /data/masks
```

From Python: `monai.bundle.ConfigWorkflow(config_file=..., meta_file=...,
workflow_type="inference", bundle_root=..., dataset_dir=...)`, then `.initialize()`,
`.run()`, `.finalize()`. The network alone: `network_def` parsed with
`monai.bundle.ConfigParser`, then `load_state_dict` of `models/model.pt` (its state dict).

## Training

{chr(10).join(_federation_lines(fm))}
"""
