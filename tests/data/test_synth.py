"""`fedmed data synth`: the synthetic multi-site brain MRI federation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.config import load_config
from fedmed.data.formats import load_site
from fedmed.data.io import read_image
from fedmed.data.synth import (
    CASES_PER_SITE,
    LABELS,
    MODALITIES,
    ScannerProfile,
    cohort_sizes,
    default_scanners,
    default_training_sections,
    federation_summary,
    generate_federation,
    simulate_subject,
    subject_seed,
    unseen_scanner,
)
from fedmed.errors import ConfigError, ImageWriteError

# Voxels 5x larger than the real scanners': ~24^3 volumes, milliseconds per case.
TINY = {"sites": 3, "cases_per_site": 2, "test_cases": 2, "unseen_cases": 1, "scale": 5.0}


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "demo"
    generate_federation(out, seed=0, progress=False, **TINY)  # type: ignore[arg-type]
    return out


def _brain_com_world(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(label > 0).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_config_validates_and_names_every_part(federation: Path) -> None:
    cfg = load_config(federation / "federation.yaml")
    assert cfg.modalities == MODALITIES
    assert cfg.labels == LABELS
    assert cfg.site_names == ["hospital-a", "hospital-b", "hospital-c"]
    assert cfg.preprocessing.target_spacing == (2.0, 2.0, 2.0)
    assert cfg.preprocessing.augment is False
    assert cfg.preprocessing.patch_size == (48, 48, 48)
    assert cfg.preprocessing.patches_per_case == 2
    assert cfg.central_test is not None and cfg.resolve(cfg.central_test).is_dir()
    assert [cfg.resolve(p).name for p in cfg.unseen_sites] == ["unseen-scanner"]
    sections = default_training_sections()
    assert list(cfg.model.channels) == sections["model"]["channels"]
    assert cfg.training.epochs == sections["training"]["epochs"]
    assert cfg.federation.rounds == sections["federation"]["rounds"]
    # the site without FLAIR is served: every site trains patches without it now and then
    assert cfg.model.droppable_modalities == ("FLAIR",)
    assert 0 < cfg.model.modality_dropout < 0.5
    assert cfg.federation.personalization == "finetune"
    assert cfg.training.test_fraction > 0.5
    for name in cfg.site_names:
        assert cfg.site_dir(name).is_dir()


def test_sites_load_in_their_formats_with_missing_flair(federation: Path) -> None:
    summary = federation_summary(federation)
    expected = {
        "hospital-a": ("msd", ()),
        "hospital-b": ("nnunet", ("FLAIR",)),
        "hospital-c": ("folder", ()),
        "central-test": ("folder", ()),
        "unseen-scanner": ("folder", ()),
    }
    counts = {r["name"]: r["cases"] for r in summary["sites"]}
    counts["central-test"] = TINY["test_cases"]
    counts["unseen-scanner"] = TINY["unseen_cases"]
    assert sum(counts[s] for s in ("hospital-a", "hospital-b", "hospital-c")) == 6
    for site, (fmt, missing) in expected.items():
        man = load_site(federation / site, expected_modalities=MODALITIES)
        assert man.format == fmt, site
        assert not man.problems, (site, man.problems)
        assert len(man.cases) == counts[site]
        for case in man.cases:
            assert case.missing == missing, (site, case.case_id)
            assert case.label is not None and case.label.is_file()
            for mf in case.images.values():
                assert mf.path.is_file()
    # MSD stores one 4D file with a channel per modality.
    man = load_site(federation / "hospital-a", expected_modalities=MODALITIES)
    assert [man.cases[0].images[m].channel for m in MODALITIES] == [0, 1, 2]


def test_written_geometry_matches_the_scanner(federation: Path) -> None:
    scanners = {s.name: s.scaled(TINY["scale"]) for s in default_scanners(3)}
    scanners["unseen-scanner"] = unseen_scanner().scaled(TINY["scale"])
    orientations = set()
    for site, prof in scanners.items():
        man = load_site(federation / site, expected_modalities=MODALITIES)
        case = man.cases[0]
        img = read_image(next(iter(case.images.values())).path)
        lab = read_image(case.label)
        assert img.spatial_shape == lab.spatial_shape == prof.grid_shape()
        np.testing.assert_allclose(img.spacing, prof.spacing, atol=1e-4)
        assert "".join(nib.aff2axcodes(img.affine)) == prof.orientation
        np.testing.assert_allclose(img.affine, lab.affine, atol=1e-5)
        assert set(np.unique(lab.array)) <= set(LABELS)
        orientations.add(prof.orientation)
    assert len(orientations) == len(scanners)


def test_files_equal_the_python_api(federation: Path) -> None:
    prof = default_scanners(3)[0].scaled(TINY["scale"])
    subj = simulate_subject(subject_seed(0, 0, 0), prof, reference_spacing=None)
    img = read_image(federation / "hospital-a" / "imagesTr" / "hospital-a-000.nii.gz")
    lab = read_image(federation / "hospital-a" / "labelsTr" / "hospital-a-000.nii.gz")
    stacked = np.concatenate([subj.images[m].array for m in MODALITIES])
    np.testing.assert_array_equal(img.array, stacked)
    np.testing.assert_array_equal(lab.array, subj.label.array)
    np.testing.assert_allclose(img.affine, subj.label.affine, atol=1e-5)


def test_same_seed_same_bytes_different_seed_differs(
    federation: Path, tmp_path: Path
) -> None:
    again = generate_federation(tmp_path / "again", seed=0, progress=False, **TINY)  # type: ignore[arg-type]
    first, second = _tree(federation), _tree(again.parent)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = _tree(
        generate_federation(tmp_path / "other", seed=1, progress=False, **TINY).parent  # type: ignore[arg-type]
    )
    assert other.keys() == first.keys()
    changed = [k for k in first if k.endswith(".nii.gz") and first[k] != other[k]]
    assert len(changed) == sum(k.endswith(".nii.gz") for k in first)


def test_labels_lesions_and_contrasts() -> None:
    prof = ScannerProfile("probe", spacing=(3.0, 3.0, 3.0), lesion_load=10.0)
    with_lesions = 0
    for seed in range(3):
        subj = simulate_subject(seed, prof, reference_spacing=None)
        lab = subj.label.array[0]
        values = set(np.unique(lab).tolist())
        assert values <= {0, 1, 2, 3, 4}
        assert {0, 1, 2, 3} <= values
        brain = np.count_nonzero(lab)
        assert np.count_nonzero(lab == 4) / brain < 0.03
        if subj.num_lesions and 4 in values:
            with_lesions += 1
            t1, t2, fl = (subj.images[m].array[0] for m in MODALITIES)
            mean = {m: [float(a[lab == k].mean()) for k in range(5)] for m, a in
                    (("T1", t1), ("T2", t2), ("FLAIR", fl))}
            bg, csf, gm, wm, les = mean["T1"]
            assert wm > gm > csf > bg and les < wm
            bg, csf, gm, wm, les = mean["T2"]
            assert csf > gm > wm > bg and les > wm
            bg, csf, gm, wm, les = mean["FLAIR"]
            assert gm > wm > csf and les > gm
    assert with_lesions >= 2


def test_lesion_load_is_site_dependent() -> None:
    prof = ScannerProfile("probe", spacing=(6.0, 6.0, 6.0))
    def count(seed: int, load: float) -> int:
        return simulate_subject(seed, prof, lesion_load=load, reference_spacing=None).num_lesions

    none = [count(s, 0.0) for s in range(6)]
    many = [count(s, 9.0) for s in range(6)]
    assert none == [0] * 6
    assert sum(many) > 12 and max(many) <= 12


def test_same_subject_same_world_geometry_across_orientations() -> None:
    a, _, c, _ = default_scanners(4)
    assert a.orientation != c.orientation and a.spacing != c.spacing
    sa = simulate_subject(11, a.scaled(2.0), reference_spacing=2.0)
    sc = simulate_subject(11, c.scaled(2.0), reference_spacing=None)
    com_a = _brain_com_world(sa.label.array[0], sa.label.affine)
    com_c = _brain_com_world(sc.label.array[0], sc.label.affine)
    assert np.linalg.norm(com_a - com_c) < 2.0
    # The scanner-grid label agrees with the fine world-space ground truth voxel by voxel.
    ref = sa.reference_label
    assert ref is not None
    com_ref = _brain_com_world(ref.array[0], ref.affine)
    assert np.linalg.norm(com_a - com_ref) < 2.0
    lab = sc.label.array[0]
    ijk = np.argwhere(lab > 0)
    world = ijk @ sc.label.affine[:3, :3].T + sc.label.affine[:3, 3]
    rijk = np.rint((world - ref.affine[:3, 3]) / np.diag(ref.affine)[:3]).astype(int)
    agree = ref.array[0][tuple(rijk.T)] == lab[tuple(ijk.T)]
    assert agree.mean() > 0.8


def test_cohort_sizes_are_skewed_with_the_requested_mean() -> None:
    weights = [s.cohort_weight for s in default_scanners(4)]
    assert cohort_sizes(4, 10, weights) == [16, 10, 8, 6]
    sizes = cohort_sizes(7, 3, [s.cohort_weight for s in default_scanners(7, seed=3)])
    assert sum(sizes) == 21 and min(sizes) >= 1 and len(set(sizes)) > 1


def test_more_sites_cycle_formats_and_profiles_are_valid() -> None:
    scanners = default_scanners(7, seed=3)
    assert [s.format for s in scanners] == ["msd", "nnunet", "folder"] * 2 + ["msd"]
    assert [s.modalities for s in scanners].count(("T1", "T2")) == 1
    assert len({s.name for s in scanners}) == 7
    for s in scanners:
        shape, affine = s.grid(np.zeros(3))
        assert "".join(nib.aff2axcodes(affine)) == s.orientation
        assert shape == s.grid_shape()
    with pytest.raises(ConfigError, match="sites"):
        default_scanners(0)
    with pytest.raises(ConfigError, match="orientation"):
        ScannerProfile("bad", orientation="XYZ").grid_shape()


def test_output_folder_rules(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ImageWriteError, match="--force"):
        generate_federation(busy, progress=False, **TINY)  # type: ignore[arg-type]
    with pytest.raises(ImageWriteError, match="synth"):
        generate_federation(busy, progress=False, force=True, **TINY)  # type: ignore[arg-type]
    assert (busy / "notes.txt").read_text() == "keep me"
    # An interrupted run left its config behind: --force may replace that folder.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "federation.yaml").write_text("name: x\n")
    (partial / "hospital-a").mkdir()
    cfg = generate_federation(partial, progress=False, force=True, **TINY)  # type: ignore[arg-type]
    assert load_config(cfg).site_names == ["hospital-a", "hospital-b", "hospital-c"]
    with pytest.raises(ConfigError, match="cases_per_site"):
        generate_federation(tmp_path / "x", cases_per_site=0, progress=False)


def test_cli_writes_a_federation_and_refuses_a_busy_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--sites", "2", "--cases-per-site", "1",
            "--test-cases", "1", "--unseen-cases", "0", "--scale", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "hospital-b" in printed and "federation.yaml" in printed
    cfg = load_config(out / "federation.yaml")
    assert cfg.unseen_sites == () and cfg.site_names == ["hospital-a", "hospital-b"]
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    before = _tree(out)
    assert main([*args, "--force"]) == 0
    assert _tree(out) == before


def test_cli_default_cohort_is_the_generators() -> None:
    import inspect

    from fedmed.cli.synth_cmd import synth

    cli_default = inspect.signature(synth).parameters["cases_per_site"].default.default
    assert cli_default == CASES_PER_SITE
    assert inspect.signature(generate_federation).parameters["cases_per_site"].default == (
        CASES_PER_SITE
    )
