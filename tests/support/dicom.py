"""Write a realistic single-frame MR DICOM series (pydicom) from a volume in the array contract."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Series:
    folder: Path
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[str, ...]


def _ds(text: float) -> str:
    return f"{float(text):.6f}".rstrip("0").rstrip(".")


def _patient_study(ds: Dataset, study_uid: str) -> None:
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "FM-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Brain MRI"


def _mr_image(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.98"
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "3"
    ds.ImagedNucleus = "1H"


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    series_number: int = 3,
    description: str = "T1 MPRAGE",
    study_uid: str | None = None,
    frame_uid: str | None = None,
) -> Series:
    """One file per slice ``volume[:, :, k]`` (X = columns, Y = rows) with its geometry.

    Args:
        folder: created; files are named by SOP Instance UID (not in slice order).
        volume: ``(X, Y, Z)`` intensities, stored as int16.
        affine: voxel-to-RAS; its three axes must be orthogonal (any rotation, any flip).
        study_uid, frame_uid: share a study / frame of reference with another series.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study, series = study_uid or generate_uid(), generate_uid()
    frame = frame_uid or generate_uid()
    sops = []
    for k in range(volume.shape[2]):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        _patient_study(ds, study)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series, series_number
        ds.SeriesDescription = description
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "BRAIN"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.Manufacturer = "fedmed-test"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.SliceThickness = _ds(spacing[2])
        _mr_image(ds)
        pixels = np.ascontiguousarray(np.rint(volume[:, :, k].T).astype(np.int16))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)
        sops.append(sop)
    return Series(folder, study, series, frame, tuple(sops))
