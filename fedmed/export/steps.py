"""The steps an exported MONAI Bundle names by ``_target_`` in ``configs/inference.json``.

A bundle's workflow is MONAI's (``SupervisedEvaluator``, ``SlidingWindowInferer``,
``Activationsd``, ``KeepLargestConnectedComponentd``, ``CheckpointLoader``); the steps here are
the glue that hands it fedmed's own reading, preprocessing and resampling, so that a bundle and
``fedmed predict`` produce the same masks. They are the bundle's stable entry points into
fedmed: a bundle names nothing else in the package.

Shapes: a data item carries ``image`` ``(C, X, Y, Z)`` float32 (a MetaTensor on the
preprocessed grid), ``available`` ``(C,)`` bool, ``case_id`` and ``reference`` (the path of
the scan whose grid the mask is written on); after inference ``pred`` is ``(K, X, Y, Z)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.data.formats import Case, ModalityFile
from fedmed.data.io import Image, image_suffix, read_image, write_label_like
from fedmed.data.planning import ModalityNormalization, PreprocessSettings
from fedmed.errors import ExportError, FedMedError

log = logging.getLogger(__name__)

IMAGE_KEY = "image"
"""Datalist key of one file holding every modality as a channel (or the only modality)."""


class BundleNetwork(nn.Module):
    """The fedmed network of a bundle, built from its model config.

    MONAI's sliding-window inferer feeds the network ``sw_batch_size`` windows at a time but
    passes extra arguments unchanged; the case's ``available`` flags ``(1, C)`` are therefore
    repeated for every window here (the same as ``LocalTrainer.predict_logits`` does).

    Args:
        model: the ``model`` section of the federation config (:class:`fedmed.config.ModelConfig`).
        in_channels: number of modalities.
        num_classes: number of labels including background.
    """

    def __init__(self, model: Mapping[str, Any], in_channels: int, num_classes: int) -> None:
        from fedmed.config import ModelConfig
        from fedmed.models import build_model

        super().__init__()
        # Inference only: which modalities training could hide does not matter here.
        cfg = ModelConfig.model_validate({**model, "droppable_modalities": None})
        self.net = build_model(cfg, in_channels, num_classes)

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, K, X, Y, Z)`` for ``(B, C, X, Y, Z)``; ``available`` ``(1|B, C)``."""
        if available is not None and available.shape[0] != x.shape[0]:
            available = available.expand(x.shape[0], -1)
        return self.net(x, available)


def settings_from_dict(settings: Mapping[str, Any]) -> PreprocessSettings:
    """The preprocessing settings a bundle records (``fedmed.data.cache.settings_record``).

    A bundle carries no federation config, only the settings its model was trained with, so
    they are rebuilt field by field here.

    Raises:
        ExportError: a field is missing or malformed.
    """
    from fedmed.data.preprocess import PIPELINE_VERSION

    try:
        norms = tuple(
            ModalityNormalization(
                str(n["kind"]),
                None if n.get("window") is None else (float(n["window"][0]), float(n["window"][1])),
            )
            for n in settings["normalization"]
        )
        spacing = [float(s) for s in settings["target_spacing"]]
        patch = [int(p) for p in settings["patch_size"]]
        built = PreprocessSettings(
            modalities=tuple(str(m) for m in settings["modalities"]),
            target_spacing=(spacing[0], spacing[1], spacing[2]),
            orientation=str(settings["orientation"]),
            normalization=norms,
            crop_foreground=bool(settings["crop_foreground"]),
            patch_size=(patch[0], patch[1], patch[2]),
        )
    except (KeyError, IndexError, TypeError, ValueError, FedMedError) as exc:
        raise ExportError(
            f"inference.json preprocessing_settings: malformed ({type(exc).__name__}: {exc}); "
            "re-export the bundle with `fedmed export bundle`"
        ) from None
    version = settings.get("version")
    if version is not None and int(version) != PIPELINE_VERSION:
        log.warning(
            "bundle preprocessing was exported with pipeline version %s, fedmed runs %s: "
            "masks may differ from the exporting fedmed's",
            version,
            PIPELINE_VERSION,
        )
    return built


def site_datalist(dataset_dir: str | Path, modalities: Sequence[str]) -> list[dict[str, Any]]:
    """Datalist of every case in a site folder (any layout ``fedmed data check`` reads).

    Returns:
        One item per case: ``case_id`` and, per modality, a path (or ``{"path", "channel"}``
        for a channel of a 4D file).

    Raises:
        DatasetFormatError: the folder is not a site in a supported layout.
    """
    from fedmed.data.formats import load_site

    manifest = load_site(Path(dataset_dir), expected_modalities=list(modalities))
    items = []
    for case in manifest.cases:
        item: dict[str, Any] = {"case_id": case.case_id}
        for m, mf in case.images.items():
            path = str(mf.path)
            item[m] = path if mf.channel is None else {"path": path, "channel": mf.channel}
        items.append(item)
    return items


def _case_id(item: Mapping[Hashable, Any], path: Path) -> str:
    if item.get("case_id"):
        return str(item["case_id"])
    suffix = image_suffix(path)
    name = path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.name
    return name or "case"


def case_from_item(item: Mapping[Hashable, Any], modalities: Sequence[str]) -> Case:
    """A datalist item as a :class:`~fedmed.data.formats.Case` (no label).

    Items name files per modality (``{"T1": path, "FLAIR": path}``; a value may be
    ``{"path": p, "channel": c}``) or give one file under ``image``: every modality as a
    channel, or the only modality of a single-modality model.

    Raises:
        ExportError: the item names no known modality, or an unknown one.
    """
    canon = {m.lower(): m for m in modalities}
    files: dict[str, ModalityFile] = {}
    if IMAGE_KEY in item and str(item[IMAGE_KEY]):
        path = Path(str(item[IMAGE_KEY]))
        for c, m in enumerate(modalities):
            files[m] = ModalityFile(path, None if len(modalities) == 1 else c)
    for key, value in item.items():
        if key in (IMAGE_KEY, "case_id"):
            continue
        name = canon.get(str(key).lower())
        if name is None:
            raise ExportError(
                f"datalist item {dict(item)}: unknown key {key!r}; use the model's modalities "
                f"{list(modalities)}, 'image' or 'case_id'"
            )
        if isinstance(value, Mapping):
            files[name] = ModalityFile(Path(str(value["path"])), value.get("channel"))
        else:
            files[name] = ModalityFile(Path(str(value)))
    if not files:
        raise ExportError(
            f"datalist item {dict(item)}: names no image; give one path per modality "
            f"{list(modalities)} or an 'image' path"
        )
    first = files[next(m for m in modalities if m in files)].path
    return Case(case_id=_case_id(item, first), images=files, label=None)


class LoadPreprocessd:
    """Read a datalist item's scans and run fedmed's preprocessing on them.

    Args:
        settings: ``PreprocessSettings.as_dict()`` of the exported model.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings_from_dict(settings)

    def __call__(self, item: Mapping[Hashable, Any]) -> dict[str, Any]:
        """``{image (C, X, Y, Z) MetaTensor, available (C,), case_id, reference}``."""
        from monai.data import MetaTensor

        from fedmed.data.preprocess import preprocess_images, read_case_images

        modalities = self.settings.modalities
        case = case_from_item(item, modalities)
        images = read_case_images(case, self.settings)
        missing = [m for m in modalities if m not in images]
        if missing:
            log.warning("%s: predicting without %s", case.case_id, missing)
        pre = preprocess_images(images, self.settings, case_id=case.case_id)
        reference = case.images[next(m for m in modalities if m in images)].path
        return {
            "image": MetaTensor(torch.from_numpy(pre.image), affine=torch.as_tensor(pre.affine)),
            "available": torch.as_tensor(pre.available, dtype=torch.bool),
            "case_id": case.case_id,
            "reference": str(reference),
        }


def _grid_affine(tensor: Any) -> np.ndarray:
    affine = getattr(tensor, "affine", None)
    if affine is None:
        raise ExportError("the prediction carries no affine; postprocessing needs a MetaTensor")
    return np.asarray(torch.as_tensor(affine).detach().cpu().numpy(), dtype=np.float64)


class ToReferenceGridd:
    """Class probabilities ``(K, X, Y, Z)`` -> labels ``(1, X', Y', Z')`` on the input scan's grid.

    The same resampling as ``fedmed predict`` (linear interpolation of each class's
    probability through world coordinates, argmax on the scan's grid). The reference scan
    is read again here and kept under ``reference_image`` for :class:`SaveMaskd`.

    Args:
        keys: the probability key (``pred``).
    """

    def __init__(self, keys: str | Sequence[str] = "pred") -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample every key in place; adds ``reference_image``."""
        from monai.data import MetaTensor

        from fedmed.data.geometry import labels_from_probabilities_on

        d = dict(data)
        ref = read_image(d["reference"])
        for key in self.keys:
            probs = torch.as_tensor(d[key]).detach().cpu().float().numpy()
            label = labels_from_probabilities_on(
                probs, _grid_affine(d[key]), ref.affine, ref.spatial_shape
            )
            d[key] = MetaTensor(torch.from_numpy(label[None]), affine=torch.as_tensor(ref.affine))
        d["reference_image"] = ref
        return d


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120] or "case"


class SaveMaskd:
    """Write the label map in the exact geometry (shape, affine, NIfTI codes) of its input.

    Args:
        keys: the label key (``pred``).
        output_dir: folder for ``<case_id><output_ext>``.
        output_ext: ``.nii.gz`` (default) or any suffix :func:`fedmed.data.io.write_image` takes.
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "pred",
        output_dir: str = "eval",
        output_ext: str = ".nii.gz",
    ) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.output_dir = Path(output_dir)
        self.output_ext = output_ext

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Write each key; records the written path under ``<key>_path``."""
        d = dict(data)
        ref = d.get("reference_image")
        if not isinstance(ref, Image):
            ref = read_image(d["reference"])
        for key in self.keys:
            label = torch.as_tensor(d[key]).detach().cpu().numpy().astype(np.uint8)
            suffix = "" if len(self.keys) == 1 else f"_{key}"
            dest = self.output_dir / f"{_safe_name(str(d['case_id']))}{suffix}{self.output_ext}"
            d[f"{key}_path"] = str(write_label_like(dest, label, ref))
            log.info("wrote %s", dest)
        return d
