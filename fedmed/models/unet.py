"""Early-fusion 3D U-Net: the modalities enter as input channels of one MONAI ``UNet``.

Also holds the pieces both architectures share: the activation/normalisation choice, the
input checks of ``forward`` and the masking of unavailable modalities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn

from fedmed.errors import ModelConfigError

# MONAI's default PReLU is kept: Opacus has no dedicated grad sampler for PReLU (nor for
# ConvTranspose3d), but GradSampleModule computes their per-sample gradients through its
# functorch fallback, and ModuleValidator accepts both (checked in tests/test_models.py).
ACTIVATION: str | tuple[str, dict[str, Any]] = "PRELU"

NormSpec = tuple[str, dict[str, Any]]


def norm_spec(norm: str, groups: int) -> NormSpec:
    """MONAI ``norm`` argument for ``model.norm``.

    Instance norm is affine so that FedBN has parameters to keep local; both choices
    have Opacus grad samplers. BatchNorm is never used (it mixes samples, which breaks
    per-sample gradients and leaks statistics across patients).
    """
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "group":
        return ("group", {"num_groups": groups})
    raise ModelConfigError(f"model.norm must be 'instance' or 'group', got {norm!r}")


def norm_for_channels(norm: NormSpec | Any, channels: int) -> NormSpec | Any:
    """``norm`` adapted to a layer with ``channels`` outputs.

    Group norm needs ``channels`` divisible by the number of groups; the config guarantees
    it for ``model.channels`` but not for the layer producing the class logits (e.g. 5
    classes with 8 groups), where the largest common divisor of both is used instead.
    """
    if isinstance(norm, tuple) and str(norm[0]).lower() == "group":
        groups = int(norm[1]["num_groups"])
        if channels % groups:
            return ("group", {**norm[1], "num_groups": math.gcd(groups, channels)})
    return norm


def check_spatial_shape(shape: Sequence[int], divisor: int, what: str = "input") -> None:
    """Raise ModelConfigError unless a 3D shape fits a network that downsamples by ``divisor``.

    Args:
        shape: spatial size ``(X, Y, Z)``.
        divisor: product of the model's strides.
        what: how the message names the shape (e.g. ``preprocessing.patch_size``).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ModelConfigError(f"{what} must be 3 positive sizes (X, Y, Z), got {shape}")
    if any(s % divisor for s in shape):
        fixed = tuple(max(divisor, math.ceil(s / divisor) * divisor) for s in shape)
        raise ModelConfigError(
            f"{what} {shape} is not divisible by {divisor}, the product of model.strides; "
            f"use multiples of {divisor}, e.g. {fixed}, or fewer/smaller strides"
        )
    if math.prod(s // divisor for s in shape) < 2:
        raise ModelConfigError(
            f"{what} {shape} leaves a single voxel at the network's bottleneck (downsampling "
            f"by {divisor}), where normalisation is undefined; use a patch of at least "
            f"{2 * divisor} along one axis, or fewer levels in model.channels"
        )


def available_mask(
    x: torch.Tensor, available: torch.Tensor | None, in_channels: int
) -> torch.Tensor:
    """Check ``forward``'s inputs and return the availability mask as ``(B, C)`` bool.

    Raises:
        ModelConfigError: ``x`` is not ``(B, in_channels, X, Y, Z)`` or ``available`` is not
            ``(B, in_channels)``.
    """
    if x.dim() != 5 or x.shape[1] != in_channels:
        raise ModelConfigError(
            f"model input must be (B, {in_channels}, X, Y, Z) (one channel per modality), "
            f"got shape {tuple(x.shape)}"
        )
    if available is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if tuple(available.shape) != tuple(x.shape[:2]):
        raise ModelConfigError(
            f"available must be (B, C) = {tuple(x.shape[:2])} (one flag per sample and "
            f"modality), got shape {tuple(available.shape)}"
        )
    return available.to(device=x.device, dtype=torch.bool)


def zero_unavailable(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the channels flagged unavailable set to exactly zero.

    ``torch.where`` rather than a multiplication, so NaN/inf garbage in a missing channel
    cannot leak through (``nan * 0`` is ``nan``).
    """
    return torch.where(
        mask[:, :, None, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device)
    )


def drop_modalities(
    mask: torch.Tensor, probability: float, droppable: Sequence[bool] | None = None
) -> torch.Tensor:
    """With probability ``probability``, hide one available modality of each sample.

    The hidden modality is drawn uniformly among the sample's available ones that
    ``droppable`` allows, and a sample is never left without a modality. Hiding one at a
    time (rather than each independently) trains the case a site actually has -- all
    modalities but one -- as often as possible: at 0.75 with three droppable modalities, a
    quarter of the patches lack FLAIR, a quarter lack T1, a quarter lack T2 and a quarter
    have all. Restricting ``droppable`` to the modalities some site lacks (``[FLAIR]``)
    trains exactly the input those sites give. Uses the global torch RNG, so
    ``torch.manual_seed`` makes it reproducible.

    Args:
        mask: ``(B, C)`` bool availability.
        probability: chance that a sample loses one modality, in ``[0, 1)``.
        droppable: per channel, whether it may be hidden; ``None``: every channel.

    Returns:
        The reduced mask (a subset of ``mask``).
    """
    candidates = mask
    if droppable is not None:
        allowed = torch.as_tensor(tuple(droppable), dtype=torch.bool, device=mask.device)
        candidates = mask & allowed[None]
    drop = torch.rand(mask.shape[0], device=mask.device) < probability
    drop &= (mask.sum(dim=1) >= 2) & candidates.any(dim=1)
    draw = torch.rand(mask.shape, device=mask.device)
    victim = torch.where(candidates, draw, torch.full_like(draw, -1.0)).argmax(dim=1)
    hidden = nn.functional.one_hot(victim, mask.shape[1]).bool() & drop[:, None]
    return mask & ~hidden


class _GroupSafeUNet(UNet):
    """MONAI ``UNet`` whose logits layer accepts group norm with any number of classes."""

    def _get_up_layer(
        self, in_channels: int, out_channels: int, strides: int, is_top: bool
    ) -> nn.Module:
        wanted = self.norm
        self.norm = norm_for_channels(wanted, out_channels)
        try:
            return super()._get_up_layer(in_channels, out_channels, strides, is_top)
        finally:
            self.norm = wanted


class EarlyFusionUNet(nn.Module):
    """3D U-Net with the modalities stacked as input channels (early fusion).

    Unavailable modalities are zeroed in ``forward``, so a missing modality is always an
    exact zero channel whatever the caller passed in it. With ``modality_dropout`` a
    training patch loses one (``droppable``) modality now and then (:func:`drop_modalities`),
    so that the network learns the zero-channel input of a site that lacks it.

    Attributes:
        in_channels: number of modalities.
        num_classes: number of output channels (labels including background).
        divisor: product of the strides; spatial input sizes must be multiples of it.
        modality_dropout: probability that a training sample loses one modality.
        droppable: per channel, whether modality dropout may hide it (``None``: all).
        net: the MONAI ``UNet``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        strides: Sequence[int],
        num_res_units: int,
        norm: NormSpec,
        dropout: float = 0.0,
        modality_dropout: float = 0.0,
        droppable: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.divisor = math.prod(strides)
        self.modality_dropout = float(modality_dropout)
        self.droppable = None if droppable is None else tuple(bool(d) for d in droppable)
        self.net = _GroupSafeUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            act=ACTIVATION,
            norm=norm,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, K, X, Y, Z)`` for images ``(B, C, X, Y, Z)``.

        Args:
            x: one channel per modality; spatial sizes multiples of ``divisor``.
            available: ``(B, C)`` bool, False where a modality is missing; None: all present.
        """
        mask = available_mask(x, available, self.in_channels)
        check_spatial_shape(x.shape[2:], self.divisor)
        dropping = self.training and self.modality_dropout > 0
        if dropping:
            mask = drop_modalities(mask, self.modality_dropout, self.droppable)
        if available is not None or dropping:
            x = zero_unavailable(x, mask)
        return self.net(x)
