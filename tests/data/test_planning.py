"""Planning: fingerprints + config -> preprocessing settings, the one way to build them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmed.config import FederationConfig, config_from_dict
from fedmed.data.cache import settings_key
from fedmed.data.planning import (
    ModalityNormalization,
    PreprocessSettings,
    plan_preprocessing,
    plan_target_spacing,
)
from fedmed.errors import ConfigError, DatasetFormatError, PreprocessingError
from tests.support.fingerprints import stub_fingerprint, write_stub_fingerprint


def _cfg(tmp_path: Path, **pre: object) -> FederationConfig:
    return config_from_dict(
        {
            "modalities": ["T1", "T2"],
            "labels": {0: "background", 1: "tissue"},
            "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
            "preprocessing": pre,
        },
        root=tmp_path,
    )


def test_plan_target_spacing_is_the_median_of_site_medians() -> None:
    fps = [
        {"site": "a", "median_spacing": [1.0, 1.0, 3.0]},
        {"site": "b", "median_spacing": [0.8, 0.9, 1.5]},
        {"site": "c", "median_spacing": [1.234, 1.111, 5.0]},
        {"site": "d", "median_spacing": None},  # no valid case: skipped
    ]
    assert plan_target_spacing(fps) == (1.0, 1.0, 3.0)
    assert plan_target_spacing(fps[1:3]) == (1.02, 1.01, 3.25)
    with pytest.raises(PreprocessingError, match="target_spacing"):
        plan_target_spacing([fps[3]])
    with pytest.raises(DatasetFormatError, match="median_spacing"):
        plan_target_spacing([{"site": "x", "median_spacing": [1.0, -1.0]}])



def test_settings_from_config_precedence(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, target_spacing=[1.5, 1.5, 2.0], normalization={"T2": {"kind": "none"}})
    s = plan_preprocessing(cfg)
    assert s.target_spacing == (1.5, 1.5, 2.0)
    assert [n.kind for n in s.normalization] == ["zscore", "none"]
    explicit = plan_preprocessing(cfg, target_spacing=(3, 3, 3))
    assert explicit.target_spacing == (3.0, 3.0, 3.0)
    assert settings_key(explicit) != settings_key(s)
    assert settings_key(plan_preprocessing(cfg)) == settings_key(s)
    # No spacing, no fingerprints: the error says how to get one.
    with pytest.raises(ConfigError, match="fedmed data check"):
        plan_preprocessing(_cfg(tmp_path))


def test_settings_planned_from_fingerprints(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="fingerprint"):
        plan_preprocessing(cfg)
    for name, ms in (("a", [1.0, 1.0, 3.0]), ("b", [1.4, 1.2, 1.0])):
        write_stub_fingerprint(tmp_path / name, ms)
    s = plan_preprocessing(cfg)
    assert s.target_spacing == pytest.approx((1.2, 1.1, 2.0))
    # A given spacing (e.g. the one a model was trained with) wins over the fingerprints.
    assert plan_preprocessing(cfg, target_spacing=(2, 2, 2)).target_spacing == (2.0, 2.0, 2.0)


def test_fingerprints_can_be_given_instead_of_read(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)  # no fingerprint on disk
    fps = [stub_fingerprint("a", [0.9, 0.9, 5.0]), stub_fingerprint("b", [1.1, 1.1, 1.0])]
    assert plan_preprocessing(cfg, fingerprints=fps).target_spacing == pytest.approx(
        (1.0, 1.0, 3.0)
    )
    # The config's spacing, when set, is used as it is.
    fixed = _cfg(tmp_path, target_spacing=[2.0, 2.0, 2.0])
    assert plan_preprocessing(fixed, fingerprints=fps).target_spacing == (2.0, 2.0, 2.0)


def test_settings_resolve_every_config_field(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        target_spacing=[1.0, 1.0, 1.0],
        orientation="LPS",
        crop_foreground=False,
        patch_size=[32, 24, 16],
        cache_dir="cache",
        normalization={"T2": {"kind": "ct_window", "window": [-100, 300]}},
    )
    s = plan_preprocessing(cfg)
    assert s.modalities == ("T1", "T2") and s.orientation == "LPS"
    assert s.crop_foreground is False and s.patch_size == (32, 24, 16)
    assert s.cache_dir == tmp_path / "cache"
    assert s.normalization == (
        ModalityNormalization(),
        ModalityNormalization("ct_window", (-100.0, 300.0)),
    )
    # cache_dir is where entries go, not what they hold: not part of the key.
    assert settings_key(s) == settings_key(PreprocessSettings(**{**s.__dict__, "cache_dir": None}))


def test_settings_are_validated_where_built() -> None:
    with pytest.raises(ConfigError, match="target_spacing"):
        PreprocessSettings(modalities=("T1",), target_spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="normalisation entries"):
        PreprocessSettings(
            modalities=("T1", "T2"),
            target_spacing=(1.0, 1.0, 1.0),
            normalization=(ModalityNormalization(),),
        )
