"""Intermediate-fusion 3D U-Net: one encoder per modality, fused at every scale.

Each modality has its own small encoder (MONAI ``ResidualUnit``/``Convolution`` blocks, the
same levels and strides as the U-Net). At every scale the encoders' features are averaged
over the modalities that are present (a missing modality contributes nothing and does not
dilute the mean), and one shared decoder with skip connections from the fused features
produces the logits. So a site without, say, FLAIR trains and predicts with the same network
as a site that has it; modality dropout during training teaches it to.

The per-modality encoders are half as wide as ``model.channels`` (rounded so group norm
still divides them; at least 1) to keep the cost near the early-fusion U-Net's: with three
modalities the encoders together cost about 3/4 of one full-width encoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from fedmed.models.unet import (
    ACTIVATION,
    NormSpec,
    available_mask,
    check_spatial_shape,
    drop_modalities,
    norm_for_channels,
    zero_unavailable,
)


def encoder_widths(channels: Sequence[int], norm: NormSpec) -> tuple[int, ...]:
    """Channels per level of one modality's encoder: half of ``channels`` where possible.

    A level keeps its full width when halving would give 0 channels or a count the group
    norm's number of groups does not divide.
    """
    widths = []
    for c in channels:
        half = c // 2
        groups = int(norm[1]["num_groups"]) if norm[0] == "group" else 1
        widths.append(half if half >= 1 and half % groups == 0 else c)
    return tuple(widths)


class IntermediateFusionUNet(nn.Module):
    """Per-modality encoders, availability-weighted fusion per scale, shared U-Net decoder.

    The topology mirrors MONAI's ``UNet``: level ``i`` downsamples by ``strides[i]``, the last
    level (the bottleneck) keeps its resolution, and each decoder stage upsamples with a
    transposed convolution (plus a residual unit when ``num_res_units > 0``).

    Attributes:
        in_channels: number of modalities (at least 2).
        num_classes: number of output channels.
        divisor: product of the strides; spatial input sizes must be multiples of it.
        modality_dropout: probability that a training sample loses one of its available
            modalities (never its last one; see :func:`fedmed.models.unet.drop_modalities`).
        droppable: per modality, whether modality dropout may hide it (``None``: all).
        encoders: one ``ModuleList`` of levels per modality.
        decoder: the up stages, deepest first.
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
        self._num_res_units = num_res_units
        self._norm = norm
        self._dropout = dropout
        widths = encoder_widths(channels, norm)
        self.encoder_widths = widths
        level_strides = (*strides, 1)  # the bottleneck keeps its resolution

        self.encoders = nn.ModuleList()
        for _ in range(in_channels):
            levels = nn.ModuleList()
            prev = 1
            for width, stride in zip(widths, level_strides, strict=True):
                levels.append(self._down(prev, width, stride))
                prev = width
            self.encoders.append(levels)

        # Decoder stage i (deepest first) takes cat(fused skip of level i, coarser result)
        # and upsamples by strides[i] to channels[i - 1] (the logits at the top).
        self.decoder = nn.ModuleList()
        coarser = widths[-1]
        for i in reversed(range(len(strides))):
            out = channels[i - 1] if i > 0 else num_classes
            self.decoder.append(self._up(widths[i] + coarser, out, strides[i], is_top=i == 0))
            coarser = out

    def _down(self, in_c: int, out_c: int, stride: int) -> nn.Module:
        if self._num_res_units > 0:
            return ResidualUnit(
                3,
                in_c,
                out_c,
                strides=stride,
                kernel_size=3,
                subunits=self._num_res_units,
                act=ACTIVATION,
                norm=self._norm,
                dropout=self._dropout,
            )
        return Convolution(
            3,
            in_c,
            out_c,
            strides=stride,
            kernel_size=3,
            act=ACTIVATION,
            norm=self._norm,
            dropout=self._dropout,
        )

    def _up(self, in_c: int, out_c: int, stride: int, is_top: bool) -> nn.Module:
        norm = norm_for_channels(self._norm, out_c)
        conv = Convolution(
            3,
            in_c,
            out_c,
            strides=stride,
            kernel_size=3,
            act=ACTIVATION,
            norm=norm,
            dropout=self._dropout,
            conv_only=is_top and self._num_res_units == 0,
            is_transposed=True,
        )
        if self._num_res_units == 0:
            return conv
        unit = ResidualUnit(
            3,
            out_c,
            out_c,
            strides=1,
            kernel_size=3,
            subunits=1,
            act=ACTIVATION,
            norm=norm,
            dropout=self._dropout,
            last_conv_only=is_top,
        )
        return nn.Sequential(conv, unit)

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, K, X, Y, Z)`` for images ``(B, C, X, Y, Z)``.

        Args:
            x: one channel per modality; spatial sizes multiples of ``divisor``.
            available: ``(B, C)`` bool, False where a modality is missing; None: all present.
        """
        mask = available_mask(x, available, self.in_channels)
        check_spatial_shape(x.shape[2:], self.divisor)
        if self.training and self.modality_dropout > 0:
            mask = drop_modalities(mask, self.modality_dropout, self.droppable)
        x = zero_unavailable(x, mask)

        weights = mask.to(x.dtype)
        # Mean over the present modalities; a sample with none gets zero features.
        norm = weights.sum(dim=1).clamp(min=1.0)
        weights = (weights / norm[:, None])[:, :, None, None, None, None]

        per_level: list[list[torch.Tensor]] = [[] for _ in self.encoder_widths]
        for m, encoder in enumerate(self.encoders):
            h = x[:, m : m + 1]
            for level, block in enumerate(cast(nn.ModuleList, encoder)):
                h = block(h)
                per_level[level].append(h)
        fused = [(torch.stack(f, dim=1) * weights).sum(dim=1) for f in per_level]

        out = fused[-1]
        for stage, skip in zip(self.decoder, reversed(fused[:-1]), strict=True):
            out = stage(torch.cat([skip, out], dim=1))
        return out
