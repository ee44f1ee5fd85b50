"""3D segmentation networks built from :class:`fedmed.config.ModelConfig`.

- ``unet``: early fusion, the modalities as input channels of a MONAI U-Net.
- ``fusion``: intermediate fusion, one encoder per modality fused at every scale, with
  modality dropout, so sites missing a modality train and predict with the same network.

Every model: ``forward(x (B, C, X, Y, Z), available (B, C) bool | None = None) -> logits
(B, K, X, Y, Z)``; no BatchNorm; accepted by Opacus' ``ModuleValidator`` as built.
"""

from fedmed.models.factory import build_model, check_patch_size, model_divisor, model_strides
from fedmed.models.fusion import IntermediateFusionUNet
from fedmed.models.summary import ModelSummary, describe_model, norm_parameter_names
from fedmed.models.unet import EarlyFusionUNet

__all__ = [
    "EarlyFusionUNet",
    "IntermediateFusionUNet",
    "ModelSummary",
    "build_model",
    "check_patch_size",
    "describe_model",
    "model_divisor",
    "model_strides",
    "norm_parameter_names",
]
