from pathlib import Path

import pytest
import yaml

from fedmed.config import config_from_dict, dump_config, load_config
from fedmed.errors import ConfigError

BASE = {
    "modalities": ["T1", "FLAIR"],
    "labels": {0: "background", 1: "lesion"},
    "sites": [{"name": "a", "path": "site-a"}, {"name": "b", "path": "/abs/site-b"}],
}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "federation.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_load_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.site_dir("a") == (tmp_path / "site-a").resolve()
    assert cfg.site_dir("b") == Path("/abs/site-b")
    assert cfg.num_classes == 2
    assert cfg.site_names == ["a", "b"]


def test_round_trip_through_dump(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        cfg.training.epochs = 3  # type: ignore[misc]


def test_with_changes_validates() -> None:
    cfg = config_from_dict(BASE, root=Path("/tmp"))
    assert cfg.with_changes(federation={"rounds": 3}).federation.rounds == 3
    with pytest.raises(ConfigError, match="rounds"):
        cfg.with_changes(federation={"rounds": 0})


def test_privacy_override_per_site() -> None:
    data = {**BASE, "sites": [{"name": "a", "path": "x", "privacy": {"max_epsilon": 2.0}}]}
    cfg = config_from_dict(data, root=Path("/tmp"))
    assert cfg.privacy_for("a").max_epsilon == 2.0
    assert cfg.privacy.max_epsilon is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": {0: "bg", 2: "x"}}, "numbered 0..N-1"),
        ({"labels": {1: "x"}}, "include 0"),
        ({"modalities": []}, "at least one modality"),
        ({"modalities": ["T1", "T1"]}, "duplicates"),
        ({"sites": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "unique"),
        ({"sites": [{"name": "bad name!", "path": "x"}]}, "sites.0.name"),
        ({"typo_key": 1}, "typo_key"),
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"training": {"loss": {"class_weights": [1.0]}}}, "class_weights"),
        ({"model": {"channels": [8, 16, 32], "strides": [2]}}, "strides"),
        ({"model": {"norm": "group", "groups": 3, "channels": [8, 16]}}, "divisible"),
        ({"preprocessing": {"patch_size": [4, 64, 64]}}, "patch_size"),
        ({"preprocessing": {"normalization": {"CT": {"kind": "zscore"}}}}, "unknown modalities"),
        ({"preprocessing": {"normalization": {"T1": {"kind": "ct_window"}}}}, "window"),
        (
            {"model": {"droppable_modalities": ["T2"]}},
            r"droppable_modalities names unknown modalities \['T2'\]",
        ),
        ({"model": {"modality_dropout": 1.0}}, "model.modality_dropout"),
        ({"training": {"val_fraction": 0.5, "test_fraction": 0.45}}, "at least 10%"),
        ({"privacy": {"weight_averaging": 1.0}}, "privacy.weight_averaging"),
    ],
)
def test_bad_configs_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **change}, root=Path("/tmp"))


def test_unknown_site_lists_known(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(ConfigError, match=r"sites are \['a', 'b'\]"):
        cfg.site("zzz")


@pytest.mark.parametrize("content", ["", "- a\n- b\n", "a: [unclosed\n"])
def test_malformed_files(tmp_path: Path, content: str) -> None:
    p = tmp_path / "f.yaml"
    p.write_text(content)
    with pytest.raises(ConfigError):
        load_config(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_template_validates() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "template-federation.yaml")
    assert cfg.site_names == ["hospital-a", "hospital-b"]
    assert cfg.privacy_for("hospital-b").max_epsilon == 4.0
    assert cfg.preprocessing.target_spacing is None  # planned from fingerprints
