"""``fedmed export bundle``: a run's model as a MONAI Bundle that MONAI's own tools run.

Layout written::

    OUT/configs/metadata.json    MONAI metadata (schema 20240725) + the federation's record
    OUT/configs/inference.json   the inference workflow (MONAI SupervisedEvaluator)
    OUT/configs/logging.conf     logging for ``python -m monai.bundle run``
    OUT/models/model.pt          the network's state dict (for ``network_def``)
    OUT/docs/README.md           what it is, how to run it, what it needs

The workflow is MONAI's: ``SupervisedEvaluator`` with ``SlidingWindowInferer`` (the patch
size, overlap and Gaussian weighting of ``fedmed predict``), ``Activationsd`` (softmax) and
``KeepLargestConnectedComponentd`` when the run post-processes that way. The network is built
from its config (``fedmed.export.steps.BundleNetwork``), so no TorchScript is needed; the
steps MONAI lacks (fedmed's reading and preprocessing, probabilities back onto the input's
grid, writing in the input's exact geometry) are ``_target_`` references into
:mod:`fedmed.export.steps`, so fedmed must be installed where the bundle runs.
After writing, the bundle is validated with ``monai.bundle.verify_metadata`` (against the
schema shipped in :mod:`fedmed.export.schema`, nothing downloaded), ``verify_net_in_out`` and
``ConfigWorkflow.check_properties``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.errors import CheckpointError, ExportError
from fedmed.export.bundle_meta import build_metadata, render_readme
from fedmed.export.schema import write_schema
from fedmed.training.checkpoint import LoadedModel, load_model

MODEL_FILE = "model.pt"
"""The run folder's checkpoint, and the bundle's weights file."""

_MONAI_LOGGERS = ("monai.bundle.scripts", "monai.bundle.workflows", "monai.apps")
_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


@dataclass(frozen=True)
class BundleExport:
    """What :func:`export_bundle` wrote.

    Attributes:
        path: the bundle folder.
        files: every file written, relative to ``path``.
        checks: the validations that passed.
    """

    path: Path
    files: tuple[str, ...]
    checks: tuple[str, ...]


def _preprocessing_settings(loaded: LoadedModel) -> dict[str, Any]:
    from fedmed.data.cache import settings_record
    from fedmed.data.planning import plan_preprocessing

    settings = plan_preprocessing(loaded.cfg, target_spacing=loaded.target_spacing)
    return settings_record(settings)


def _postprocessing(loaded: LoadedModel) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "fedmed.export.steps.ToReferenceGridd", "keys": "pred"},
    ]
    if loaded.cfg.training.postprocess_lcc:
        steps.append(
            {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": list(range(1, loaded.cfg.num_classes)),
                "independent": True,
            }
        )
    steps.append(
        {
            "_target_": "fedmed.export.steps.SaveMaskd",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_ext": ".nii.gz",
        }
    )
    return steps


def inference_config(loaded: LoadedModel) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's evaluator around fedmed's pre- and post-processing."""
    cfg = loaded.cfg
    training = cfg.training
    return {
        "imports": ["$import torch", "$import fedmed.export.steps as fedmed_steps"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "modalities": list(cfg.modalities),
        "datalist": "$fedmed_steps.site_datalist(@dataset_dir, @modalities)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "fedmed.export.steps.BundleNetwork",
            "model": cfg.model.model_dump(mode="json"),
            "in_channels": len(cfg.modalities),
            "num_classes": cfg.num_classes,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing_settings": _preprocessing_settings(loaded),
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "fedmed.export.steps.LoadPreprocessd",
                    "settings": "@preprocessing_settings",
                }
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(cfg.preprocessing.patch_size),
            "sw_batch_size": training.sw_batch_size,
            "overlap": training.sw_overlap,
            "mode": "gaussian",
        },
        "postprocessing": {"_target_": "Compose", "transforms": _postprocessing(loaded)},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": f"$@bundle_root + '/models/{MODEL_FILE}'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "prepare_batch": {
                "_target_": "PrepareBatchExtraInput",
                "extra_keys": {"available": "available"},
            },
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _load_run(run_dir: Path) -> LoadedModel:
    if not run_dir.exists():
        raise ExportError(
            f"run folder {run_dir} does not exist; give the folder `fedmed simulate`, "
            "`fedmed centralized` or `fedmed local` wrote (it holds model.pt)"
        )
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder; give the run folder that holds model.pt")
    try:
        return load_model(run_dir / MODEL_FILE, device="cpu")
    except CheckpointError as exc:
        raise ExportError(f"run folder {run_dir}: {exc}") from None


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ExportError(
                f"{out} already exists and is not an empty folder; choose another OUT or pass "
                "--force to replace it"
            )
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def _save_weights(loaded: LoadedModel, network: dict[str, Any], dest: Path) -> None:
    import torch

    from fedmed.export.steps import BundleNetwork

    net = BundleNetwork(network["model"], network["in_channels"], network["num_classes"])
    net.net.load_state_dict(loaded.model.state_dict())
    torch.save(net.state_dict(), dest)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def export_bundle(run_dir: str | Path, out: str | Path, *, force: bool = False) -> BundleExport:
    """Write and validate the MONAI Bundle of a run's model.

    Args:
        run_dir: the run folder (``model.pt``; ``summary.json`` and ``comparison.json`` are
            recorded when present).
        out: the bundle folder to create.
        force: replace an existing ``out``.

    Raises:
        ExportError: no run folder or model, ``out`` exists, or the bundle fails validation.
    """
    from fedmed.models import model_divisor

    run, dest = Path(run_dir), Path(out)
    loaded = _load_run(run)
    _prepare_out(dest, force)
    inference = inference_config(loaded)
    meta = build_metadata(loaded, run, model_divisor(loaded.cfg.model))
    _write_json(dest / "configs" / "inference.json", inference)
    _write_json(dest / "configs" / "metadata.json", meta)
    (dest / "configs" / "logging.conf").write_text(_LOGGING_CONF)
    _save_weights(loaded, inference["network_def"], dest / "models" / MODEL_FILE)
    (dest / "docs" / "README.md").write_text(render_readme(meta, inference))
    checks = validate_bundle(dest, patch_size=loaded.cfg.preprocessing.patch_size)
    files = tuple(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))
    return BundleExport(dest, files, checks)


def validate_bundle(bundle: Path, patch_size: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """Validate a bundle with MONAI's own tools; returns the checks that passed.

    ``verify_metadata`` runs against the schema of :mod:`fedmed.export.schema` (written to a
    temporary file, so MONAI finds it and downloads nothing); ``verify_net_in_out`` runs the
    network on a random input of the declared shape (one patch); ``check_properties`` lists
    the inference properties MONAI requires.

    Raises:
        ExportError: a check fails (the message says which and why).
    """
    from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

    meta = bundle / "configs" / "metadata.json"
    config = bundle / "configs" / "inference.json"
    # MONAI logs every argument of every check at INFO, and that it skipped the download.
    quiet = [logging.getLogger(n) for n in _MONAI_LOGGERS]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            schema = write_schema(Path(tmp) / "meta_schema_20240725.json")
            digest = hashlib.md5(schema.read_bytes(), usedforsecurity=False).hexdigest()
            try:
                verify_metadata(meta_file=str(meta), filepath=str(schema), hash_val=digest)
            except ValueError as exc:
                raise ExportError(f"{meta}: fails MONAI's metadata schema: {exc}") from None
        divisor_n = _fake_multiplier(meta, patch_size)
        try:
            verify_net_in_out(
                net_id="network_def",
                meta_file=str(meta),
                config_file=str(config),
                device="cpu",
                n=divisor_n,
            )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ExportError(f"{config}: network_def fails verify_net_in_out: {exc}") from None
        workflow = ConfigWorkflow(
            config_file=str(config),
            meta_file=str(meta),
            logging_file=False,
            workflow_type="inference",
            bundle_root=str(bundle),
            datalist=[],  # build every component without reading any data
        )
        workflow.initialize()
        missing = workflow.check_properties()
        if missing:
            raise ExportError(f"{config}: lacks MONAI inference properties {missing}")
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return ("verify_metadata", "verify_net_in_out", "check_properties")


def _fake_multiplier(meta: Path, patch_size: tuple[int, ...] | None) -> int:
    """``n`` for the declared ``"<divisor>*n"`` input shape: one patch, or 16 voxels at least."""
    shape = json.loads(meta.read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"]
    divisor = int(str(shape[0]).split("*")[0])
    size = max(patch_size) if patch_size else 16
    return max(1, math.ceil(size / divisor))
