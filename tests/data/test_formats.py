"""Site formats: detection and loading of MSD, nnU-Net v2 and folder-per-case sites."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmed.data.formats import detect_format, load_site
from fedmed.data.io import read_image
from fedmed.errors import DatasetFormatError

MODALITIES = ("T1", "T2", "FLAIR")
LABELS = {0: "background", 1: "tissue", 2: "lesion"}


@pytest.mark.parametrize(
    ("fmt", "detected"),
    [
        ("folder", "folder"),
        ("folder-noyaml", "folder"),
        ("msd", "msd"),
        ("msd-split", "msd"),
        ("nnunet", "nnunet"),
    ],
)
def test_every_format_is_detected_and_loaded(
    fmt: str, detected: str, make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "hospital-x", fmt, n_cases=3)
    assert detect_format(site) == detected
    m = load_site(site)
    assert m.format == detected
    assert m.root == site.resolve()
    assert m.name == "hospital-x"
    # A bare folder declares nothing: its modalities are the file names found (sorted).
    declared = tuple(sorted(MODALITIES)) if fmt == "folder-noyaml" else MODALITIES
    assert m.modalities == declared
    assert m.problems == ()
    assert len(m.cases) == 3
    for case in m.cases:
        assert tuple(case.images) == declared
        assert case.missing == ()
        assert case.label is not None and case.label.is_file()
        for mf in case.images.values():
            assert mf.path.is_file() and mf.path.is_relative_to(m.root)
    # Labels: declared by site.yaml / dataset.json; a bare folder declares none.
    assert m.labels == ({} if fmt == "folder-noyaml" else LABELS)


def test_msd_4d_multichannel_maps_channels_in_order(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "msd", "msd", n_cases=2)
    m = load_site(site)
    case = m.case("case_001")
    paths = {mf.path for mf in case.images.values()}
    assert paths == {site.resolve() / "imagesTr/case_001.nii.gz"}
    assert [case.images[mod].channel for mod in MODALITIES] == [0, 1, 2]
    assert case.files() == [site.resolve() / "imagesTr/case_001.nii.gz", case.label]
    # Channel c of the file is modality c (conftest's T1 < T2 < FLAIR in the foreground).
    img = read_image(case.images["T2"].path)
    fg = img.array[:, img.array[0] > 0]
    assert np.all(np.median(fg, axis=1) == np.sort(np.median(fg, axis=1)))


def test_msd_single_modality_file_has_no_channel(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "ct", "msd", n_cases=1, modalities=("CT",))
    case = load_site(site).cases[0]
    assert case.images["CT"].channel is None


def test_msd_modality_mapping_form(make_site: Callable[..., Path], tmp_path: Path) -> None:
    site = make_site(tmp_path / "msd", "msd-split", n_cases=2)
    meta = json.loads((site / "dataset.json").read_text())
    entry = meta["training"][0]
    entry["image"] = {"FLAIR": entry["image"][2], "T1": entry["image"][0], "T2": entry["image"][1]}
    (site / "dataset.json").write_text(json.dumps(meta))
    case = load_site(site).case("case_000")
    assert case.images["FLAIR"].path.name == "case_000_FLAIR.nii.gz"
    assert case.images["T1"].path.name == "case_000_T1.nii.gz"


def test_nnunet_reads_channel_names_labels_and_file_ending(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "nn", "nnunet", n_cases=2)
    # Switch the dataset to uncompressed files: file_ending decides what is listed.
    for f in sorted(site.rglob("*.nii.gz")):
        f.rename(f.with_name(f.name.replace(".nii.gz", ".nii")))
    meta = json.loads((site / "dataset.json").read_text())
    meta["file_ending"] = ".nii"
    meta["channel_names"] = {"0": "T1", "1": "T2", "2": "FLAIR"}
    (site / "dataset.json").write_text(json.dumps(meta))
    m = load_site(site)
    assert m.format == "nnunet"
    assert m.labels == LABELS  # nnU-Net's name -> value, inverted
    assert [c.case_id for c in m.cases] == ["FED_000", "FED_001"]
    c = m.case("FED_001")
    assert c.images["FLAIR"].path.name == "FED_001_0002.nii"
    assert c.label is not None and c.label.name == "FED_001.nii"


def test_nnunet_bad_names_and_channels_are_problems(
    make_site: Callable[..., Path], write_nifti: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "nn", "nnunet", n_cases=2)
    vol = np.ones((16, 16, 16), np.float32)
    write_nifti(site / "imagesTr/FED_000_0007.nii.gz", vol)  # channel 7 undeclared
    write_nifti(site / "imagesTr/FED_000_T1.nii.gz", vol)  # not _XXXX
    m = load_site(site)
    files = {Path(p.file).name for p in m.problems}
    assert files == {"FED_000_0007.nii.gz", "FED_000_T1.nii.gz"}
    assert all(p.kind == "manifest" for p in m.problems)
    assert tuple(m.case("FED_000").images) == MODALITIES


def test_folder_with_site_yaml_uses_its_order_labels_and_name(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "dir", "folder", n_cases=2)
    declared = {"name": "st-elsewhere", "modalities": ["FLAIR", "T1", "T2"], "labels": LABELS}
    (site / "site.yaml").write_text(yaml.safe_dump(declared))
    m = load_site(site)
    assert m.name == "st-elsewhere"
    assert m.modalities == ("FLAIR", "T1", "T2")
    assert m.labels == LABELS
    assert load_site(site, name="override").name == "override"


def test_folder_without_site_yaml_infers_modalities_and_ignores_other_files(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "bare", "folder-noyaml", n_cases=2)
    (site / "case_000" / "notes.txt").write_text("not an image")
    (site / ".fedmed-cache").mkdir()
    (site / "README.md").write_text("site readme")
    m = load_site(site)
    assert {c.case_id for c in m.cases} == {"case_000", "case_001"}
    assert set(m.modalities) == set(MODALITIES)
    assert all(set(c.images) == set(MODALITIES) for c in m.cases)


@pytest.mark.parametrize(
    ("fmt", "delete", "case_id"),
    [
        ("folder", "case_001/T2.nii.gz", "case_001"),
        ("folder-noyaml", "case_001/T2.nii.gz", "case_001"),
        ("nnunet", "imagesTr/FED_001_0001.nii.gz", "FED_001"),
    ],
)
def test_missing_modality_is_recorded_per_case(
    fmt: str, delete: str, case_id: str, make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "s", fmt, n_cases=3)
    (site / delete).unlink()
    m = load_site(site)
    assert m.case(case_id).missing == ("T2",)
    assert set(m.case(case_id).images) == {"T1", "FLAIR"}
    assert all(c.missing == () for c in m.cases if c.case_id != case_id)


def test_expected_modalities_match_case_insensitively(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "s", "folder", n_cases=2)
    m = load_site(site, expected_modalities=["t1", "flair", "t2", "PD"])
    case = m.cases[0]
    assert set(case.images) == {"t1", "flair", "t2"}  # the federation's spelling
    assert case.missing == ("PD",)
    assert m.modalities == ("t1", "t2", "flair")  # the site's own, respelled


def test_extra_modality_is_a_problem(make_site: Callable[..., Path], tmp_path: Path) -> None:
    site = make_site(tmp_path / "s", "folder", n_cases=2)
    m = load_site(site, expected_modalities=["T1", "T2"])
    assert all(set(c.images) == {"T1", "T2"} for c in m.cases)
    assert {(p.case_id, p.kind) for p in m.problems} == {
        ("case_000", "unexpected_modality"),
        ("case_001", "unexpected_modality"),
    }
    assert all("FLAIR" in p.message for p in m.problems)


def test_duplicate_case_ids_are_problems(make_site: Callable[..., Path], tmp_path: Path) -> None:
    site = make_site(tmp_path / "s", "msd-split", n_cases=3)
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][1]))
    (site / "dataset.json").write_text(json.dumps(meta))
    m = load_site(site)
    assert [c.case_id for c in m.cases] == ["case_000", "case_001", "case_002"]
    assert [(p.case_id, p.kind) for p in m.problems] == [("case_001", "duplicate_case")]
    assert "duplicate case id" in m.problems[0].message


@pytest.mark.parametrize("escape", ["../outside.nii.gz", "/etc/passwd", "imagesTr/../../x.nii.gz"])
def test_paths_escaping_the_site_are_problems(
    escape: str, make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "s", "msd-split", n_cases=2)
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"][0]["image"][1] = escape
    meta["training"][1]["label"] = escape
    (site / "dataset.json").write_text(json.dumps(meta))
    m = load_site(site)
    assert {(p.case_id, p.kind, p.file) for p in m.problems} == {
        ("case_000", "path_escapes_site", escape),
        ("case_001", "path_escapes_site", escape),
    }
    assert m.case("case_000").missing == ("T2",)  # the escaping file is never used
    assert m.case("case_001").label is None


def test_malformed_msd_entries_are_problems_not_crashes(
    make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "s", "msd-split", n_cases=1)
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"] += [{"label": "x.nii.gz"}, {"image": []}, {"image": 3}, "junk"]
    (site / "dataset.json").write_text(json.dumps(meta))
    m = load_site(site)
    assert [c.case_id for c in m.cases] == ["case_000"]
    assert [p.case_id for p in m.problems] == ["#1", "#2", "#3", "#4"]


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda d: None, id="empty-folder"),
        pytest.param(lambda d: (d / "scan.nii.gz").write_bytes(b"x"), id="loose-file"),
        pytest.param(
            lambda d: ((d / "case1").mkdir(), (d / "case1/readme.txt").write_text("x")),
            id="folder-without-images",
        ),
        pytest.param(
            lambda d: (d / "dataset.json").write_text(json.dumps({"description": "x"})),
            id="dataset-json-without-keys",
        ),
        pytest.param(lambda d: (d / "dataset.json").write_text("{oops"), id="invalid-json"),
        pytest.param(lambda d: (d / "dataset.json").write_text("[1, 2]"), id="json-list"),
        pytest.param(
            lambda d: (d / "dataset.json").write_text(
                json.dumps({"channel_names": {"0": "T1"}, "file_ending": ".nii.gz"})
            ),
            id="nnunet-without-labels",
        ),
        pytest.param(
            lambda d: (d / "dataset.json").write_text(
                json.dumps({"modality": {"0": "CT"}, "training": "all"})
            ),
            id="msd-training-not-a-list",
        ),
    ],
)
def test_unknown_layout_raises(setup: Callable[[Path], object], tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    setup(site)
    with pytest.raises(DatasetFormatError, match=str(site)):
        load_site(site)


def test_missing_site_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="does not exist"):
        load_site(tmp_path / "nowhere")


def test_bad_site_yaml_raises(make_site: Callable[..., Path], tmp_path: Path) -> None:
    site = make_site(tmp_path / "s", "folder", n_cases=1)
    (site / "site.yaml").write_text("modalities: [T1\n")
    with pytest.raises(DatasetFormatError, match="site.yaml"):
        load_site(site)


def test_case_lookup_error(make_site: Callable[..., Path], tmp_path: Path) -> None:
    m = load_site(make_site(tmp_path / "s", "folder", n_cases=1))
    with pytest.raises(DatasetFormatError, match="no case 'zzz'"):
        m.case("zzz")
