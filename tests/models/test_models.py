"""Tests of fedmed.models: shapes, argument checks, missing modalities, Opacus, summaries."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedmed.config import ModelConfig
from fedmed.errors import ModelConfigError
from fedmed.models import (
    EarlyFusionUNet,
    IntermediateFusionUNet,
    ModelSummary,
    build_model,
    check_patch_size,
    describe_model,
    norm_parameter_names,
)
from fedmed.models.fusion import encoder_widths
from fedmed.models.unet import drop_modalities

ARCHS = ["unet", "fusion"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(**kw: Any) -> ModelConfig:
    base: dict[str, Any] = {"channels": (4, 8, 16), "num_res_units": 1}
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    ("cfg", "in_ch", "classes", "shape"),
    [
        ({"architecture": "unet"}, 3, 5, (16, 16, 16)),
        ({"architecture": "fusion"}, 3, 5, (16, 16, 16)),
        ({"architecture": "unet", "num_res_units": 0}, 1, 2, (8, 8, 16)),
        ({"architecture": "fusion", "num_res_units": 0}, 2, 3, (8, 8, 16)),
        ({"architecture": "unet", "num_res_units": 2}, 2, 4, (16, 8, 24)),
        ({"architecture": "fusion", "num_res_units": 2}, 3, 4, (16, 8, 24)),
        # group norm where the class count is not divisible by the groups (logits layer)
        ({"architecture": "unet", "norm": "group", "groups": 4}, 3, 5, (16, 16, 16)),
        ({"architecture": "fusion", "norm": "group", "groups": 4}, 3, 5, (16, 16, 16)),
        (
            {"architecture": "fusion", "norm": "group", "groups": 8, "channels": (8, 16)},
            2,
            3,
            (8, 8, 8),
        ),
        # anisotropic strides/depths
        ({"architecture": "unet", "channels": (4, 8), "strides": (1,)}, 2, 3, (5, 6, 7)),
        (
            {"architecture": "fusion", "channels": (4, 8, 8, 16), "strides": (2, 1, 2)},
            2,
            3,
            (8, 12, 8),
        ),
        ({"architecture": "unet", "channels": (4, 4, 8, 8), "dropout": 0.1}, 3, 2, (8, 16, 32)),
    ],
)
def test_output_shape(
    cfg: dict[str, Any], in_ch: int, classes: int, shape: tuple[int, ...]
) -> None:
    model = build_model(_cfg(**cfg), in_ch, classes)
    model.eval()
    x = torch.randn(2, in_ch, *shape)
    available = torch.ones(2, in_ch, dtype=torch.bool)
    available[1, 0] = False
    with torch.no_grad():
        out = model(x, available)
        out_none = model(x)
    assert out.shape == (2, classes, *shape)
    assert out_none.shape == out.shape
    assert torch.isfinite(out).all()
    expected = EarlyFusionUNet if cfg["architecture"] == "unet" else IntermediateFusionUNet
    assert isinstance(model, expected)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _fusion(cfg: ModelConfig, in_ch: int, classes: int) -> IntermediateFusionUNet:
    model = build_model(cfg, in_ch, classes)
    assert isinstance(model, IntermediateFusionUNet)
    return model


def _raw_cfg(**kw: Any) -> ModelConfig:
    """A ModelConfig that skips pydantic validation (as model_construct callers may do)."""
    fields = ModelConfig().model_dump()
    fields.update(kw)
    return ModelConfig.model_construct(**fields)


@pytest.mark.parametrize(
    ("cfg", "in_ch", "classes", "match"),
    [
        (_cfg(), 0, 3, "in_channels"),
        (_cfg(), 2, 1, "num_classes"),
        (_cfg(architecture="fusion"), 1, 3, "at least 2"),
        (_raw_cfg(channels=(4, 8, 16), strides=(2,)), 2, 3, "model.strides"),
        (_raw_cfg(channels=(4, 8), strides=(0,)), 2, 3, "model.strides"),
        (_raw_cfg(channels=(4,)), 2, 3, "model.channels"),
        (_raw_cfg(channels=(4, 6), norm="group", groups=4), 2, 3, "model.groups"),
        (_raw_cfg(architecture="transformer"), 2, 3, "architecture"),
    ],
)
def test_bad_build_args(cfg: ModelConfig, in_ch: int, classes: int, match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        build_model(cfg, in_ch, classes)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ((16, 16, 18), "not divisible by 4"),
        ((4, 4, 4), "single voxel"),
        ((16, 16), "3 positive sizes"),
    ],
)
def test_bad_patch_size(patch: tuple[int, ...], match: str) -> None:
    cfg = _cfg()
    with pytest.raises(ModelConfigError, match=match):
        check_patch_size(cfg, patch)
    with pytest.raises(ModelConfigError, match=match):
        build_model(cfg, 2, 3, patch_size=patch)
    model = build_model(cfg, 2, 3)
    with pytest.raises(ModelConfigError, match=match):
        describe_model(model, 2, patch)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_forward_inputs(arch: str) -> None:
    model = build_model(_cfg(architecture=arch), 3, 2)
    with pytest.raises(ModelConfigError, match=r"\(B, 3, X, Y, Z\)"):
        model(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ModelConfigError, match="not divisible"):
        model(torch.zeros(1, 3, 8, 8, 10))
    with pytest.raises(ModelConfigError, match="available"):
        model(torch.zeros(1, 3, 8, 8, 8), torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("arch", ARCHS)
def test_missing_modality_content_is_ignored(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(architecture=arch), 3, 3).eval()
    x = torch.randn(1, 3, 8, 8, 16)
    available = torch.tensor([[True, False, True]])
    garbage = x.clone()
    garbage[:, 1] = torch.randn(8, 8, 16) * 100
    nans = x.clone()
    nans[:, 1] = float("nan")
    with torch.no_grad():
        ref = model(x, available)
        assert torch.equal(model(garbage, available), ref)
        assert torch.equal(model(nans, available), ref)
        # the channel does matter when it is flagged available
        assert not torch.allclose(model(garbage), model(x))
    assert torch.isfinite(ref).all()


def test_unet_missing_channel_equals_zero_channel() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(architecture="unet"), 2, 3).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    zeroed = x.clone()
    zeroed[:, 0] = 0
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([[False, True]])), model(zeroed))


def test_fusion_batch_mixing_cases_with_and_without_modality() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(architecture="fusion"), 3, 3).eval()
    x = torch.randn(3, 3, 8, 8, 16)
    available = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    with torch.no_grad():
        batch = model(x, available)
        for i in range(3):
            alone = model(x[i : i + 1], available[i : i + 1])
            torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        # hiding a modality changes the prediction (fusion excludes it from the mean)
        full = model(x[1:2])
    assert not torch.allclose(batch[1:2], full)


def test_fusion_mean_over_present_modalities() -> None:
    """A sample whose only present modality is duplicated gets the single-modality result."""
    torch.manual_seed(0)
    model = _fusion(_cfg(architecture="fusion"), 2, 3).eval()
    # Tie both encoders' weights: the mean of two identical features equals either one.
    encoders = list(model.encoders)
    encoders[1].load_state_dict(encoders[0].state_dict())
    img = torch.randn(1, 1, 8, 8, 8)
    both = torch.cat([img, img], dim=1)
    with torch.no_grad():
        one = model(both, torch.tensor([[True, False]]))
        two = model(both, torch.tensor([[True, True]]))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


def test_encoder_widths_halved_where_norm_allows() -> None:
    assert encoder_widths((16, 32, 64), ("instance", {"affine": True})) == (8, 16, 32)
    assert encoder_widths((1, 2), ("instance", {"affine": True})) == (1, 1)
    assert encoder_widths((8, 16, 32), ("group", {"num_groups": 8})) == (8, 8, 16)


def test_drop_modalities_hides_at_most_one_and_never_the_last() -> None:
    mask = torch.ones(6000, 3, dtype=torch.bool)
    mask[:1000, 2] = False  # two present
    mask[1000:2000, 1:] = False  # one present: always kept
    mask[5990:] = False  # samples with nothing present stay that way
    torch.manual_seed(3)
    dropped = drop_modalities(mask, 0.75)
    assert not (dropped & ~mask).any()
    lost = (mask.sum(dim=1) - dropped.sum(dim=1))
    assert lost.max() <= 1
    assert torch.equal(dropped[1000:2000], mask[1000:2000])
    assert not dropped[5990:].any()
    # three present: a sample loses one with p = 0.75, each modality equally often (0.25)
    full = dropped[2000:5990]
    assert 0.72 < lost[2000:5990].float().mean().item() < 0.78
    for m in range(3):
        assert 0.22 < 1 - full[:, m].float().mean().item() < 0.28
    assert 0.72 < lost[:1000].float().mean().item() < 0.78
    torch.manual_seed(3)
    assert torch.equal(drop_modalities(mask, 0.75), dropped)


def test_drop_modalities_hides_only_the_droppable_ones() -> None:
    mask = torch.ones(4000, 3, dtype=torch.bool)
    mask[:1000, 2] = False  # FLAIR already missing: nothing droppable left, kept whole
    torch.manual_seed(5)
    dropped = drop_modalities(mask, 0.3, (False, False, True))
    assert torch.equal(dropped[:, :2], mask[:, :2])
    assert torch.equal(dropped[:1000], mask[:1000])
    assert 0.27 < 1 - dropped[1000:, 2].float().mean().item() < 0.33


@pytest.mark.parametrize("arch", ARCHS)
def test_droppable_modalities_by_name(arch: str) -> None:
    cfg = _cfg(architecture=arch, modality_dropout=0.5, droppable_modalities=("FLAIR",))
    model = build_model(cfg, ["T1", "T2", "FLAIR"], 3)
    assert model.droppable == (False, False, True)
    assert model.modality_dropout == 0.5
    with pytest.raises(ModelConfigError, match="needs the modality names"):
        build_model(cfg, 3, 3)
    with pytest.raises(ModelConfigError, match=r"\['FLAIR'\], which are not among"):
        build_model(cfg, ["T1", "T2"], 3)
    with pytest.raises(ModelConfigError, match="got the string 'T1'"):
        build_model(_cfg(architecture="unet"), "T1", 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_modality_dropout_only_in_training_and_reproducible(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(architecture=arch, modality_dropout=0.5, num_res_units=0), 3, 3)
    x = torch.randn(4, 3, 8, 8, 8)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(model(x), ref)
        model.train()
        torch.manual_seed(11)
        a = model(x)
        torch.manual_seed(11)
        b = model(x)
        c = model(x)
        model.modality_dropout = 0.0
        no_drop = model(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, no_drop)


def test_same_seed_same_initial_weights() -> None:
    for arch in ARCHS:
        cfg = _cfg(architecture=arch)
        torch.manual_seed(7)
        a = build_model(cfg, 2, 3).state_dict()
        torch.manual_seed(7)
        b = build_model(cfg, 2, 3).state_dict()
        torch.manual_seed(8)
        c = build_model(cfg, 2, 3).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize(("arch", "norm"), [(a, n) for a in ARCHS for n in ("instance", "group")])
def test_opacus_validate_and_per_sample_grads(arch: str, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(architecture=arch, norm=norm, groups=2, channels=(4, 8)), 2, 3)
    ModuleValidator.validate(model, strict=True)  # raises on any incompatible layer
    assert ModuleValidator.validate(model, strict=False) == []
    plain = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(2, 2, 8, 8, 8)
    available = torch.tensor([[True, True], [True, False]])
    target = torch.randint(0, 3, (2, 8, 8, 8))
    loss = nn.functional.cross_entropy(gsm(x, available), target, reduction="sum")
    loss.backward()
    params = [(n, p) for n, p in gsm.named_parameters() if p.requires_grad]
    assert params
    per_sample = {}
    for name, p in params:
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (2, *p.shape), name
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-3, atol=1e-4)
        per_sample[name] = p.grad_sample[0].clone()
    # sample 0's per-sample gradient equals the gradient of sample 0 alone
    loss0 = nn.functional.cross_entropy(plain(x[:1], available[:1]), target[:1], reduction="sum")
    grads = torch.autograd.grad(loss0, list(plain.parameters()))
    for (name, _), g in zip(params, grads, strict=True):
        torch.testing.assert_close(per_sample[name], g, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("arch", "norm"), [("unet", "instance"), ("fusion", "group")])
def test_norm_parameter_names(arch: str, norm: str) -> None:
    model = build_model(_cfg(architecture=arch, norm=norm, groups=4), 3, 4)
    names = norm_parameter_names(model)
    keys = set(model.state_dict())
    assert names
    assert names <= keys
    modules = dict(model.named_modules())
    norm_types = (nn.InstanceNorm3d, nn.GroupNorm)
    for name in names:
        owner, _, leaf = name.rpartition(".")
        assert isinstance(modules[owner], norm_types), name
        assert leaf in {"weight", "bias"}
    expected = {
        f"{mod_name}.{leaf}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, norm_types)
        for leaf in ("weight", "bias")
    }
    assert names == expected
    assert any(k.endswith("conv.weight") for k in keys - names)


def _saved_tensor_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd really saves in a CPU forward (weights excluded), and the largest."""
    weights = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values()), max(saved.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_model(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(architecture=arch), 3, 4)
    summary = describe_model(model, 3, (16, 16, 16))
    assert isinstance(summary, ModelSummary)
    assert summary.parameters == sum(p.numel() for p in model.parameters())
    assert summary.megabytes_weights == pytest.approx(summary.parameters * 4 / 2**20)
    assert summary.megabytes_activations_estimate > 0
    saved, largest = _saved_tensor_bytes(model.train(), torch.randn(1, 3, 16, 16, 16))
    assert summary.megabytes_activations_estimate * 2**20 == pytest.approx(saved + 2 * largest)
    bigger = describe_model(model, 3, (32, 32, 32))
    assert bigger.megabytes_activations_estimate == pytest.approx(
        8 * summary.megabytes_activations_estimate, rel=1e-2
    )
    text = str(summary)
    assert "\n" not in text
    assert f"{summary.parameters:,} parameters" in text
    assert "16x16x16" in text
    with pytest.raises(ModelConfigError, match="in_channels"):
        describe_model(model, 0, (16, 16, 16))


def test_fusion_cheaper_than_twice_unet() -> None:
    cfg = {"channels": (16, 32, 64, 128), "num_res_units": 2}
    unet = describe_model(build_model(_cfg(architecture="unet", **cfg), 3, 5), 3, (32, 32, 32))
    fusion = describe_model(build_model(_cfg(architecture="fusion", **cfg), 3, 5), 3, (32, 32, 32))
    assert fusion.parameters < unet.parameters
    assert fusion.megabytes_activations_estimate < 2 * unet.megabytes_activations_estimate


def test_build_model_logs_summary(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedmed.models"):
        model = build_model(_cfg(), 2, 3, patch_size=(16, 16, 32))
    n = sum(p.numel() for p in model.parameters())
    assert any(
        f"{n:,} parameters" in r.getMessage() and "16x16x32" in r.getMessage()
        for r in caplog.records
    )
