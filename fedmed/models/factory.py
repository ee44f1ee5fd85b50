"""Build a network from :class:`fedmed.config.ModelConfig`."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from opacus.validators import ModuleValidator
from torch import nn

from fedmed.config import ModelConfig
from fedmed.errors import ModelConfigError
from fedmed.models.fusion import IntermediateFusionUNet
from fedmed.models.summary import describe_model
from fedmed.models.unet import EarlyFusionUNet, check_spatial_shape, norm_spec

_log = logging.getLogger(__name__)

# Patch the build log's activation estimate refers to when the caller names none.
_REFERENCE_PATCH = 64


def model_strides(model_cfg: ModelConfig) -> tuple[int, ...]:
    """Down-sampling per level: ``model.strides``, or 2 at every level.

    Raises:
        ModelConfigError: ``strides`` does not have ``len(channels) - 1`` positive entries.
    """
    channels = tuple(model_cfg.channels)
    if model_cfg.strides is None:
        return (2,) * (len(channels) - 1)
    strides = tuple(int(s) for s in model_cfg.strides)
    if len(strides) != len(channels) - 1 or any(s < 1 for s in strides):
        raise ModelConfigError(
            f"model.strides needs len(model.channels) - 1 = {len(channels) - 1} positive "
            f"entries (one per down-sampling step), got {list(strides)} for channels "
            f"{list(channels)}"
        )
    return strides


def model_divisor(model_cfg: ModelConfig) -> int:
    """The product of the strides: patch sizes must be multiples of it."""
    return math.prod(model_strides(model_cfg))


def check_patch_size(model_cfg: ModelConfig, patch_size: Sequence[int]) -> None:
    """Raise ModelConfigError unless ``patch_size`` fits the network ``model_cfg`` describes."""
    check_spatial_shape(patch_size, model_divisor(model_cfg), what="preprocessing.patch_size")


def _check_config(model_cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
    # ModelConfig validates itself, but model_construct/model_copy(update=...) bypass that.
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModelConfigError(
            f"in_channels must be an integer >= 1 (one per modality), got {in_channels!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelConfigError(
            f"num_classes must be an integer >= 2 (labels including background), "
            f"got {num_classes!r}; check the config's labels"
        )
    channels = tuple(model_cfg.channels)
    if len(channels) < 2 or any(c < 1 for c in channels):
        raise ModelConfigError(
            f"model.channels needs at least 2 positive entries (one per level), "
            f"got {list(channels)}"
        )
    model_strides(model_cfg)
    if model_cfg.norm == "group" and any(c % model_cfg.groups for c in channels):
        raise ModelConfigError(
            f"model.norm 'group' with model.groups={model_cfg.groups} needs every entry of "
            f"model.channels divisible by it, got {list(channels)}; change groups or channels"
        )
    if not 0 <= model_cfg.dropout < 1 or not 0 <= model_cfg.modality_dropout < 1:
        raise ModelConfigError(
            f"model.dropout and model.modality_dropout must be in [0, 1), got "
            f"{model_cfg.dropout} and {model_cfg.modality_dropout}"
        )
    if model_cfg.architecture == "fusion" and in_channels < 2:
        raise ModelConfigError(
            f"model.architecture 'fusion' fuses one encoder per modality and needs at least 2 "
            f"modalities, got in_channels={in_channels}; use architecture 'unet' for a single "
            f"modality"
        )


def droppable_channels(
    model_cfg: ModelConfig, modalities: int | Sequence[str]
) -> tuple[bool, ...] | None:
    """Per channel, whether ``model.modality_dropout`` may hide it (``None``: every one).

    Raises:
        ModelConfigError: ``model.droppable_modalities`` is set but only a channel count is
            known, or it names a modality not in ``modalities``.
    """
    names = model_cfg.droppable_modalities
    if names is None:
        return None
    if isinstance(modalities, int):
        raise ModelConfigError(
            f"model.droppable_modalities {list(names)} needs the modality names; pass the "
            f"config's modalities instead of a channel count"
        )
    unknown = sorted(set(names) - set(modalities))
    if unknown:
        raise ModelConfigError(
            f"model.droppable_modalities names {unknown}, which are not among modalities "
            f"{list(modalities)}"
        )
    return tuple(m in names for m in modalities)


def _channel_count(modalities: int | Sequence[str]) -> int:
    if isinstance(modalities, str):
        raise ModelConfigError(
            f"modalities must be the list of modality names or their number, got the string "
            f"{modalities!r}; pass [{modalities!r}]"
        )
    return modalities if isinstance(modalities, int) else len(modalities)


def build_model(
    model_cfg: ModelConfig,
    modalities: int | Sequence[str],
    num_classes: int,
    *,
    patch_size: Sequence[int] | None = None,
) -> nn.Module:
    """The network ``model_cfg`` describes, ready for (DP-)training.

    ``unet`` is :class:`~fedmed.models.unet.EarlyFusionUNet` (modalities as input channels);
    ``fusion`` is :class:`~fedmed.models.fusion.IntermediateFusionUNet` (one encoder per
    modality). Both take ``forward(x (B, C, X, Y, Z), available (B, C) bool | None)`` and
    return logits ``(B, K, X, Y, Z)``. No BatchNorm; Opacus' ``ModuleValidator`` accepts the
    result as is. Initial weights follow the global torch seed. The summary is logged (INFO).

    Args:
        model_cfg: the config's ``model`` section.
        modalities: the config's modality names (one input channel each), or only their
            number when ``model.droppable_modalities`` is unset.
        num_classes: number of labels including background.
        patch_size: optional training patch; when given it is checked against the strides
            and the logged activation estimate refers to it.

    Raises:
        ModelConfigError: inconsistent arguments (see the message for the parameter).
    """
    in_channels = _channel_count(modalities)
    _check_config(model_cfg, in_channels, num_classes)
    droppable = droppable_channels(model_cfg, modalities)
    strides = model_strides(model_cfg)
    divisor = math.prod(strides)
    if patch_size is not None:
        check_patch_size(model_cfg, patch_size)
    norm = norm_spec(model_cfg.norm, model_cfg.groups)
    model: nn.Module
    if model_cfg.architecture == "unet":
        model = EarlyFusionUNet(
            in_channels,
            num_classes,
            model_cfg.channels,
            strides,
            model_cfg.num_res_units,
            norm,
            model_cfg.dropout,
            model_cfg.modality_dropout,
            droppable,
        )
    elif model_cfg.architecture == "fusion":
        model = IntermediateFusionUNet(
            in_channels,
            num_classes,
            model_cfg.channels,
            strides,
            model_cfg.num_res_units,
            norm,
            model_cfg.dropout,
            model_cfg.modality_dropout,
            droppable,
        )
    else:
        raise ModelConfigError(
            f"model.architecture must be 'unet' or 'fusion', got {model_cfg.architecture!r}"
        )
    problems = ModuleValidator.validate(model, strict=False)
    if problems:  # a regression in this package, not a user error; still say what broke
        raise ModelConfigError(
            f"the {model_cfg.architecture} network is not Opacus-compatible: {problems}"
        )
    if _log.isEnabledFor(logging.INFO):
        reference = (
            tuple(patch_size)
            if patch_size is not None
            else ((max(_REFERENCE_PATCH // divisor, 2) * divisor,) * 3)
        )
        _log.info("model %s", describe_model(model, in_channels, reference))
    return model
