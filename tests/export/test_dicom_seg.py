"""fedmed predict --format dicom-seg: a DICOM SEG that overlays its source series.

The oracle is independent of fedmed's geometry code: SimpleITK (GDCM) reads the series and
resamples fedmed's NIfTI mask onto it (nearest neighbour); each of its slices belongs to the
SOP instance GDCM sorted there. highdicom reads the SEG back per source instance.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from fedmed.cli.main import main
from fedmed.data.io import write_image
from tests.support.debian import ToolUnavailable, ensure_tool
from tests.support.dicom import Series, write_dicom_series
from tests.support.runs import grid, scan, train_toy_run

LESION_TYPE, ABNORMAL_CATEGORY = "52988006", "49755003"  # SNOMED CT: Lesion; Morph. abnormal


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_toy_run(tmp_path_factory.mktemp("run"), labels={1: "lesion"})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def dicom_case(folder: Path, axcodes: str, spacing: tuple, shape: tuple, rotate: float) -> tuple:
    """T1 and FLAIR DICOM series of one generated case (same study and frame of reference)."""
    aff = grid(axcodes, spacing, shape, rotate)
    images, _ = scan(aff, shape, seed=5)
    t1 = write_dicom_series(folder / "T1", images["T1"].array[0], aff, description="T1")
    flair = write_dicom_series(
        folder / "FLAIR",
        images["FLAIR"].array[0],
        aff,
        series_number=4,
        description="FLAIR",
        study_uid=t1.study_uid,
        frame_uid=t1.frame_of_reference_uid,
    )
    return t1, flair


def oracle_frames(mask: Path, series: Series) -> dict[str, np.ndarray]:
    """The NIfTI mask resampled (SimpleITK, nearest) onto each slice: SOP UID -> (rows, cols)."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series.folder))
    reader.SetFileNames(files)
    ref = reader.Execute()
    img = sitk.ReadImage(str(mask))
    res = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
    arr = sitk.GetArrayFromImage(res)  # (slices, rows, columns)
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return dict(zip(sops, arr, strict=True))


def seg_frames(seg: hd.seg.Segmentation, sops: list[str], segment: int) -> np.ndarray:
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sops,
        segment_numbers=[segment],
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(px)[..., 0]


def assert_references(seg: hd.seg.Segmentation, series: Series) -> None:
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.PatientID == "FM-0001"
    refs = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in refs] == [series.series_uid]
    referenced = {i.ReferencedSOPInstanceUID for i in refs[0].ReferencedInstanceSequence}
    assert referenced == set(series.sop_uids)
    uids = {uid for _, _, uid in seg.get_source_image_uids()}
    assert uids <= set(series.sop_uids) and uids


def predict(model: Path, images: list[str], out: Path, *extra: str) -> int:
    argv = ["predict", "--model", str(model), "--out", str(out), *extra]
    return main(argv + [a for i in images for a in ("--image", i)])


@pytest.mark.parametrize(
    ("axcodes", "spacing", "shape", "rotate"),
    [
        ("LPS", (1.5, 1.5, 2.0), (36, 30, 24), 0.0),
        ("RAS", (1.3, 1.2, 2.0), (34, 30, 24), 17.0),  # oblique
        ("LIA", (1.2, 2.0, 1.4), (40, 24, 32), 0.0),  # coronal slices, permuted axes
    ],
    ids=["lps-axial", "oblique", "coronal"],
)
def test_seg_from_a_dicom_series_matches_the_nifti_mask(
    model: Path, tmp_path: Path, axcodes: str, spacing: tuple, shape: tuple, rotate: float
) -> None:
    t1, flair = dicom_case(tmp_path / "dicom", axcodes, spacing, shape, rotate)
    images = [f"T1={t1.folder}", f"FLAIR={flair.folder}"]
    nifti, seg_path = tmp_path / "mask.nii.gz", tmp_path / "seg.dcm"
    assert predict(model, images, nifti) == 0
    assert predict(model, images, seg_path, "--format", "dicom-seg") == 0
    seg = hd.seg.segread(seg_path)
    assert_references(seg, t1)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == "lesion"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == LESION_TYPE
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ABNORMAL_CATEGORY
    expected = oracle_frames(nifti, t1)
    want = np.stack(list(expected.values())) == 1
    got = seg_frames(seg, list(expected), 1)
    d = dice(got, want)
    print(f"SEG vs NIfTI mask on the series ({axcodes}, rotate {rotate}): Dice {d:.4f}")
    assert want.sum() > 500 and d >= 0.99


def test_seg_of_a_nifti_scan_on_a_reference_series(model: Path, tmp_path: Path) -> None:
    """A NIfTI input (oblique) with --dicom-reference: a series on another grid (LPS axial)."""
    aff = grid("RAS", (1.3, 1.6, 1.4), (34, 30, 32), 17.0)
    images, _ = scan(aff, (34, 30, 32), seed=9)
    files = [f"{m}={write_image(tmp_path / f'{m}.nii.gz', images[m].array, aff)}" for m in images]
    ref_aff = grid("LPS", (1.0, 1.0, 2.5), (44, 40, 20))
    series = write_dicom_series(
        tmp_path / "ref", scan(ref_aff, (44, 40, 20), 3)[0]["T1"].array[0], ref_aff
    )
    nifti, seg_path = tmp_path / "mask.nii.gz", tmp_path / "seg.dcm"
    assert predict(model, files, nifti) == 0
    extra = ("--format", "dicom-seg", "--dicom-reference", str(series.folder))
    assert predict(model, files, seg_path, *extra) == 0
    seg = hd.seg.segread(seg_path)
    assert_references(seg, series)
    expected = oracle_frames(nifti, series)
    want = np.stack(list(expected.values())) == 1
    d = dice(seg_frames(seg, list(expected), 1), want)
    print(f"SEG vs NIfTI mask resampled to the reference series: Dice {d:.4f}")
    assert want.sum() > 500 and d >= 0.99


def test_code_table_for_other_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ball = train_toy_run(tmp_path / "ball-run")  # labels: background, ball
    t1, flair = dicom_case(tmp_path / "dicom", "LPS", (1.5, 1.5, 2.0), (36, 30, 24), 0.0)
    images = [f"T1={t1.folder}", f"FLAIR={flair.folder}"]
    seg_path = tmp_path / "seg.dcm"
    assert predict(ball, images, seg_path, "--format", "dicom-seg") == 1
    assert "no DICOM code for labels ['ball']" in capsys.readouterr().err
    assert not seg_path.exists()
    table = tmp_path / "codes.yaml"
    table.write_text(
        "ball:\n  category: SCT:Tissue\n"
        "  type: {value: '123037004', scheme: SCT, meaning: Body structure}\n"
    )
    assert predict(ball, images, seg_path, "--format", "dicom-seg", "--codes", str(table)) == 0
    (segment,) = hd.seg.segread(seg_path).SegmentSequence
    assert segment.SegmentLabel == "ball"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "123037004"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Tissue"


def test_seg_passes_dciodvfy(model: Path, tmp_path: Path) -> None:
    """dicom3tools' validator finds no error in the SEG (or in the source it references)."""
    try:
        dciodvfy = ensure_tool("dciodvfy", "dicom3tools")
    except ToolUnavailable as exc:
        pytest.skip(str(exc))
    t1, flair = dicom_case(tmp_path / "dicom", "RAS", (1.3, 1.2, 2.0), (34, 30, 24), 17.0)
    seg_path = tmp_path / "seg.dcm"
    images = [f"T1={t1.folder}", f"FLAIR={flair.folder}"]
    assert predict(model, images, seg_path, "--format", "dicom-seg") == 0
    for path in (seg_path, t1.folder / f"{t1.sop_uids[0]}.dcm"):
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        report = (proc.stdout + proc.stderr).strip()
        print(f"dciodvfy {path.name}:\n{report}")
        assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report
