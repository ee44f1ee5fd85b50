"""Inference back into the patient's geometry (``fedmed predict``).

The input scans are preprocessed exactly as in training (RAS, target spacing, normalisation,
crop), segmented with sliding-window inference, and the label map is resampled back through
world coordinates onto the first input's own voxel grid, so the mask has the input's shape
and affine (and NIfTI qform/sform codes) and overlays in any viewer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.data.io import Image
from fedmed.errors import FedMedError
from fedmed.training.checkpoint import LoadedModel

log = logging.getLogger(__name__)


def assign_modalities(images: Sequence[str], modalities: Sequence[str]) -> dict[str, Path]:
    """Map ``--image`` arguments to the model's modalities.

    Each argument is ``MODALITY=PATH`` or a bare path whose file name names the modality
    (``T1.nii.gz``, ``case_flair.nii.gz``; case-insensitive, the longest match wins).

    Raises:
        FedMedError: an unknown or repeated modality, or a file name naming none.
    """
    out: dict[str, Path] = {}
    canon = {m.lower(): m for m in modalities}
    for arg in images:
        if "=" in arg:
            mod, _, path = arg.partition("=")
            if mod.lower() not in canon:
                raise FedMedError(
                    f"--image {arg}: unknown modality {mod!r}; the model expects {list(modalities)}"
                )
            name = canon[mod.lower()]
        else:
            path = arg
            stem = Path(arg).name.lower()
            hits = [m for m in canon if m in stem]
            if not hits:
                raise FedMedError(
                    f"--image {arg}: cannot tell the modality from the file name; write it as "
                    f"MODALITY=PATH with MODALITY one of {list(modalities)}"
                )
            name = canon[max(hits, key=len)]
        if name in out:
            raise FedMedError(f"--image: modality {name} given twice ({out[name]} and {path})")
        out[name] = Path(path)
    return out


@dataclass(frozen=True)
class Prediction:
    """A label map on the reference image's grid."""

    label: np.ndarray
    reference: Image
    missing: tuple[str, ...]


def predict_images(
    loaded: LoadedModel, images: Mapping[str, Image], device: str | None = None
) -> Prediction:
    """Segment one case given as images keyed by modality.

    Args:
        loaded: the model from :func:`fedmed.training.checkpoint.load_model`.
        images: modality -> image (array contract); at least one modality.
        device: override the training device.

    Returns:
        The label map ``(X, Y, Z)`` on the grid of the first of the model's modalities given.
    """
    import torch

    from fedmed.data.geometry import labels_from_probabilities_on
    from fedmed.data.planning import plan_preprocessing
    from fedmed.data.preprocess import preprocess_images
    from fedmed.training.trainer import LocalTrainer

    cfg = loaded.cfg
    if not images:
        raise FedMedError(f"no input image; the model expects {list(cfg.modalities)}")
    missing = tuple(m for m in cfg.modalities if m not in images)
    if missing:
        log.warning("predicting without %s (the model treats them as unavailable)", missing)
    reference = images[next(m for m in cfg.modalities if m in images)]
    settings = plan_preprocessing(cfg, target_spacing=loaded.target_spacing)
    pre = preprocess_images(dict(images), settings)
    trainer = LocalTrainer(cfg, loaded.model, device=device)
    # Probabilities, not labels, go back to the scan's grid (linear interpolation, argmax
    # there): the scan is usually finer than the working spacing, and thin structures
    # survive that way (as in nnU-Net's export).
    probs = torch.softmax(trainer.predict_logits(pre.image, pre.available), dim=0).cpu().numpy()
    label = labels_from_probabilities_on(
        probs, pre.affine, reference.affine, reference.spatial_shape
    )
    if cfg.training.postprocess_lcc:
        label = trainer.largest_components(label)
    return Prediction(np.asarray(label, dtype=np.uint8), reference, missing)


def split_channels(image: Image, modalities: Sequence[str]) -> dict[str, Image]:
    """A 4D multi-channel image (MSD style, one channel per modality) as one image each."""
    if image.array.shape[0] != len(modalities):
        raise FedMedError(
            f"{image.source}: has {image.array.shape[0]} channels, the model expects "
            f"{len(modalities)} ({list(modalities)}); give one --image per modality instead"
        )
    return {
        m: Image(image.array[c : c + 1], image.affine, image.source, image.header)
        for c, m in enumerate(modalities)
    }

