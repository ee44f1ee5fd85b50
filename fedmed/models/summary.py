"""Size of a network: parameters, weights and an activation-memory estimate."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedmed.errors import ModelConfigError
from fedmed.models.unet import check_spatial_shape

_MB = 1024.0**2


@dataclass(frozen=True)
class ModelSummary:
    """What a network costs.

    Attributes:
        parameters: number of parameter elements (trainable or not).
        megabytes_weights: parameters plus buffers, in MiB.
        megabytes_activations_estimate: activation memory of one forward + backward pass
            at batch 1 and the given patch size, in MiB (an estimate, see
            :func:`describe_model`); scales linearly with the batch size.
        patch_size: the patch the estimate is for.
        architecture: the network's class name.
    """

    parameters: int
    megabytes_weights: float
    megabytes_activations_estimate: float
    patch_size: tuple[int, int, int] | None = None
    architecture: str = ""

    def __str__(self) -> str:
        where = "x".join(str(s) for s in self.patch_size) if self.patch_size else "?"
        name = f"{self.architecture}: " if self.architecture else ""
        return (
            f"{name}{self.parameters:,} parameters, {self.megabytes_weights:.1f} MB weights, "
            f"~{self.megabytes_activations_estimate:.0f} MB activations per patch "
            f"(forward+backward, batch 1, patch {where})"
        )


def activation_bytes(model: nn.Module, in_channels: int, patch_size: Sequence[int]) -> int:
    """Estimated bytes of activation memory for one training forward + backward at batch 1.

    A copy of the model runs a training-mode forward on PyTorch's ``meta`` device (shapes
    only: no memory, no compute, no RNG draws) while a ``saved_tensors_hooks`` pack hook
    records every tensor autograd keeps for the backward pass, counted once per underlying
    tensor and excluding the weights. On CPU this matches the real saved-tensor bytes
    exactly. The backward pass holds, in addition, about two gradients the size of the
    largest saved tensor at a time, which is added; allocator overhead is not.
    """
    ghost = copy.deepcopy(model).to("meta").train()
    weights = {id(p) for p in ghost.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in weights:
            saved[id(base)] = base  # holding it keeps id() unique for the whole pass
        return t

    x = torch.empty((1, in_channels, *patch_size), device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ghost(x)
    sizes = [t.numel() * t.element_size() for t in saved.values()]
    return sum(sizes) + 2 * max(sizes, default=0)


def describe_model(model: nn.Module, in_channels: int, patch_size: Sequence[int]) -> ModelSummary:
    """Parameter count, weight size and activation-memory estimate of ``model``.

    Args:
        model: a network from :func:`fedmed.models.build_model` (any ``nn.Module`` taking
            ``(B, C, X, Y, Z)`` works).
        in_channels: number of input channels (modalities).
        patch_size: spatial patch ``(X, Y, Z)`` the activation estimate is for.

    Raises:
        ModelConfigError: ``in_channels`` < 1, or ``patch_size`` does not fit the network
            (not 3 sizes, or not divisible by the product of its strides).
    """
    if in_channels < 1:
        raise ModelConfigError(f"in_channels must be at least 1 (modalities), got {in_channels}")
    patch = tuple(int(s) for s in patch_size)
    divisor = getattr(model, "divisor", 1)
    check_spatial_shape(patch, int(divisor), what="patch_size")
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    return ModelSummary(
        parameters=sum(p.numel() for p in params),
        megabytes_weights=weight_bytes / _MB,
        megabytes_activations_estimate=activation_bytes(model, in_channels, patch) / _MB,
        patch_size=(patch[0], patch[1], patch[2]),
        architecture=type(model).__name__,
    )


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names (``model.state_dict()`` keys) of every normalisation layer's parameters/buffers.

    These are what FedBN keeps local to each site: instance, group, layer (and, for
    foreign models, batch/RMS) norm weights, biases and running statistics.
    """
    norm_types: tuple[type[nn.Module], ...] = (
        nn.modules.batchnorm._NormBase,  # InstanceNorm*d and BatchNorm*d
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
    )
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        norm_types = (*norm_types, rms)
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, norm_types):
            names.update(module.state_dict(prefix=f"{prefix}." if prefix else "").keys())
    return names


__all__ = ["ModelSummary", "activation_bytes", "describe_model", "norm_parameter_names"]
