"""Image I/O behind one pair of functions: :func:`read_image` and :func:`write_image`.

The array contract everywhere in fedmed: an image is ``(C, X, Y, Z)`` float32 with a 4x4
affine that maps voxel indices ``(i, j, k)`` to RAS world coordinates in mm. The voxel order
is the one on disk (reorienting is a preprocessing step); only the affine is converted, so
a SimpleITK image (LPS) and a NIfTI image (RAS) of the same scan give the same world
coordinates.

Formats: ``.nii`` / ``.nii.gz`` through nibabel; ``.nrrd``, ``.mha``, ``.mhd`` and DICOM
series folders through SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.read_rules import (
    DEFAULT_MAX_MEGAVOXELS,
    channels_first,
    check_affine,
    check_finite,
    check_header,
    nifti_layout,
)
from fedmed.errors import ConfigError, ImageReadError, ImageWriteError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

# LPS (ITK) <-> RAS (NIfTI) world coordinates: flip x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Image:
    """An image in the array contract.

    Attributes:
        array: ``(C, X, Y, Z)`` float32 voxels (C = 1 for a 3D file).
        affine: ``(4, 4)`` float64 voxel-to-RAS-world matrix (mm).
        source: the file or folder it was read from, if any.
        header: format-specific geometry to write a derived image back exactly
            (for NIfTI: ``qform_code``, ``sform_code``, ``qform``, ``sform``).
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path | None = None
    header: dict[str, object] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``."""
        x, y, z = self.array.shape[1:]
        return int(x), int(y), int(z)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])


def image_suffix(path: Path) -> str:
    """The image suffix of ``path`` (``.nii.gz`` counts as one), lower-case."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def is_image_path(path: Path) -> bool:
    """Whether ``path`` names a supported image file (by suffix) or a DICOM folder."""
    return image_suffix(path) in IMAGE_SUFFIXES or (path.is_dir() and _is_dicom_dir(path))


def _is_dicom_dir(path: Path) -> bool:
    return any(p.suffix.lower() in (".dcm", "") and p.is_file() for p in path.iterdir())


def read_image(path: str | Path, *, max_megavoxels: float = DEFAULT_MAX_MEGAVOXELS) -> Image:
    """Read an image file or DICOM series folder into the array contract, safely.

    Every path that reads patient images (``fedmed data check``, preprocessing, the training
    cache, ``fedmed predict``) goes through this function, so the same rules
    (:mod:`fedmed.data.read_rules`) apply everywhere:

    1. from the header alone, before any voxel is read: a 3D volume (or 4D with channels
       last, at most :data:`~fedmed.data.read_rules.MAX_CHANNELS` channels, no empty axis), at most
       ``max_megavoxels`` million voxels per channel, and a finite, non-singular affine;
       a header that claims a huge volume therefore allocates nothing;
    2. after reading: scalar voxels (not complex or RGB) and no NaN or infinite value.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd`` or a DICOM series folder.
        max_megavoxels: largest size the header may claim, in millions of voxels per
            channel (the config's ``preprocessing.max_case_megavoxels``; at a federated site
            the policy's ``data.max_image_megavoxels``).

    Returns:
        :class:`Image` with ``array`` ``(C, X, Y, Z)`` float32 and a RAS ``affine``.

    Raises:
        ImageReadError: the file is missing, unreadable, corrupt, truncated, in an
            unsupported format, not 3D/4D, larger than the limit, has non-finite voxels or
            a singular / non-finite affine; :attr:`ImageReadError.kind` says which
            (:data:`fedmed.data.read_rules.ReadFailure`).
    """
    p = Path(path)
    if not max_megavoxels > 0:
        raise ConfigError(
            f"read_image: max_megavoxels must be a positive number, got {max_megavoxels!r}; "
            "set preprocessing.max_case_megavoxels (or the policy's max_image_megavoxels)"
        )
    if not p.exists():
        raise ImageReadError(
            f"{p}: file does not exist (check the path or the manifest)", "missing"
        )
    if p.is_dir():
        image = _read_dicom(p, max_megavoxels)
    elif image_suffix(p) in NIFTI_SUFFIXES:
        image = _read_nifti(p, max_megavoxels)
    elif image_suffix(p) in SITK_SUFFIXES:
        image = _read_sitk(p, max_megavoxels)
    else:
        raise ImageReadError(
            f"{p}: unsupported image format {image_suffix(p)!r}; expected one of "
            f"{', '.join(IMAGE_SUFFIXES)} or a DICOM series folder",
            "unsupported",
        )
    check_finite(p, image.array)
    return image


# -- formats -----------------------------------------------------------------------------


def _read_nifti(p: Path, max_megavoxels: float) -> Image:
    import nibabel as nib

    try:
        img: Any = nib.load(str(p))  # the header only: nibabel reads voxels lazily
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a file that is no NIfTI
        raise ImageReadError(
            f"{p}: cannot read the NIfTI header ({type(exc).__name__}: {exc}); the file is "
            "not a NIfTI image or is damaged: re-export it from the scanner or PACS",
            "not_an_image",
        ) from None
    spatial, channels = nifti_layout(p, shape)
    check_header(p, spatial, channels, affine, max_megavoxels)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated or damaged voxel data
        raise ImageReadError(
            f"{p}: the header is readable but the voxel data are not ({type(exc).__name__}: "
            f"{exc}); the file is corrupt or truncated: re-export or re-copy it",
            "corrupt",
        ) from None
    hdr = img.header
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    header: dict[str, object] = {
        "format": "nifti",
        "qform_code": int(qcode or 0),
        "sform_code": int(scode or 0),
        "qform": None if qform is None else np.asarray(qform),
        "sform": None if sform is None else np.asarray(sform),
    }
    return Image(channels_first(data, p), affine, p, header)


def _sitk_affine(img: object) -> np.ndarray:
    """The RAS affine of a SimpleITK image or of a file reader after its header was read."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64)  # type: ignore[attr-defined]
    dim = int(round(np.sqrt(direction.size)))
    d = direction.reshape(dim, dim)[:3, :3]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]  # type: ignore[attr-defined]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:3]  # type: ignore[attr-defined]
    aff = np.eye(4)
    aff[:3, :3] = d @ np.diag(spacing)
    aff[:3, 3] = origin
    return _LPS_TO_RAS @ aff


def _from_sitk(img: Any, p: Path) -> Image:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X) or (Z, Y, X, C)
    if arr.ndim == 3:
        arr = arr.transpose(2, 1, 0)
    else:
        arr = arr.transpose(2, 1, 0, 3)
    return Image(channels_first(arr, p), _sitk_affine(img), p, {"format": "sitk"})


def _sitk_header(p: Path, reader: Any, max_megavoxels: float, slices: int = 1) -> None:
    """Refuse what a SimpleITK reader's header (``ReadImageInformation``) says is bad.

    Args:
        p: the file or DICOM folder.
        reader: an ``ImageFileReader`` whose header was read.
        max_megavoxels: the limit per channel.
        slices: files in the DICOM series (each with the header's slices); 1 for a file.
    """
    dim = int(reader.GetDimension())
    size = tuple(int(s) for s in reader.GetSize())
    if slices > 1 and dim == 2:
        size, dim = (*size, 1), 3
    if dim != 3:
        raise ImageReadError(
            f"{p}: expected a 3D image, got {dim}D (size {size}); convert it to one 3D "
            "volume per modality",
            "not_3d",
        )
    spatial = (size[0], size[1], size[2] * slices)
    channels = int(reader.GetNumberOfComponents())
    check_header(p, spatial, channels, _sitk_affine(reader), max_megavoxels)


def _read_sitk(p: Path, max_megavoxels: float) -> Image:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        raise ImageReadError(
            f"{p}: cannot read the image header ({_sitk_reason(exc)}); the file is not an "
            "image or is in another format than its suffix says",
            "not_an_image",
        ) from None
    _sitk_header(p, reader, max_megavoxels)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise ImageReadError(
            f"{p}: the header is readable but the voxel data are not ({_sitk_reason(exc)}); "
            "the file is corrupt or truncated: re-export or re-copy it",
            "corrupt",
        ) from None
    return _from_sitk(img, p)


def _sitk_reason(exc: Exception) -> str:
    """The informative line of an ITK exception (its last line is often a stale errno)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR" in ln:
            return ln.split("ERROR:", 1)[-1].strip()
    return lines[-1] if lines else type(exc).__name__


def _read_dicom(p: Path, max_megavoxels: float) -> Image:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    if not series:
        raise ImageReadError(
            f"{p}: folder holds no DICOM series (expected .dcm slices)", "not_an_image"
        )
    if len(series) > 1:
        raise ImageReadError(
            f"{p}: folder holds {len(series)} DICOM series; put each series in its own folder",
            "not_an_image",
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series[0])
    # The size is the first slice's rows x columns (x frames) times the number of files:
    # known from one header, before any pixel data is read.
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        first.ReadImageInformation()
    except Exception as exc:
        raise ImageReadError(
            f"{p}: cannot read the DICOM header of {Path(files[0]).name} "
            f"({_sitk_reason(exc)}); re-export the series",
            "not_an_image",
        ) from None
    _sitk_header(p, first, max_megavoxels, slices=len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise ImageReadError(
            f"{p}: cannot read the DICOM series ({_sitk_reason(exc)}); re-export it",
            "corrupt",
        ) from None
    # The affine of a series comes from every slice's position: check it as read.
    check_affine(p, _sitk_affine(img))
    return _from_sitk(img, p)


def write_image(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    reference: Image | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write an image in the array contract.

    Args:
        path: destination; the suffix picks the format (NIfTI via nibabel, else SimpleITK).
        array: ``(C, X, Y, Z)`` or ``(X, Y, Z)``; C > 1 is written as a 4D/vector image.
        affine: ``(4, 4)`` voxel-to-RAS matrix.
        reference: an image read by :func:`read_image` whose header geometry (NIfTI qform/sform
            codes) is copied, so that the output overlays its source exactly.
        dtype: on-disk dtype; default the array's.

    Returns:
        The written path.

    Raises:
        ImageWriteError: bad array or affine shape, or unsupported suffix.
    """
    p = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (3, 4):
        raise ImageWriteError(f"{p}: array must be (C, X, Y, Z) or (X, Y, Z), got {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ImageWriteError(f"{p}: affine must be 4x4, got {aff.shape}")
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.dtype == np.bool_:  # neither NIfTI nor ITK stores booleans: masks become uint8
        arr = arr.astype(np.uint8)
    suffix = image_suffix(p)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageWriteError(
            f"{p}: unsupported suffix {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(p, arr, aff, reference)
        else:
            _write_sitk(p, arr, aff)
    except OSError as exc:
        raise ImageWriteError(
            f"{p}: cannot write ({exc}); check that the folder exists and is writable"
        ) from None
    return p


def _write_nifti(p: Path, arr: np.ndarray, aff: np.ndarray, reference: Image | None) -> None:
    import nibabel as nib

    data = np.moveaxis(arr, 0, -1) if arr.ndim == 4 else arr
    img = nib.Nifti1Image(data, aff)
    hdr = reference.header if reference is not None else {}
    if hdr.get("format") == "nifti" and reference is not None:
        # Keep the source's qform/sform codes so viewers place the mask exactly where the
        # source is (a viewer may prefer the qform over the sform or vice versa).
        qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])  # type: ignore[call-overload]
        if np.allclose(aff, reference.affine, atol=1e-6):
            qform, sform = hdr.get("qform"), hdr.get("sform")
        else:
            # A new geometry (e.g. resampled): the reference's matrices would misplace it, so
            # write the requested affine and keep only the codes (at least one must be set,
            # or readers fall back to the voxel sizes alone).
            qform = sform = None
            if qcode == 0 and scode == 0:
                qcode = scode = 1
        img.set_qform(aff if qform is None else qform, code=qcode)  # type: ignore[arg-type]
        img.set_sform(aff if sform is None else sform, code=scode)  # type: ignore[arg-type]
    else:
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(p))


def _write_sitk(p: Path, arr: np.ndarray, aff: np.ndarray) -> None:
    import SimpleITK as sitk

    vector = arr.ndim == 4
    zyx = arr.transpose(3, 2, 1, 0) if vector else arr.transpose(2, 1, 0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(zyx), isVector=vector)
    lps = _LPS_TO_RAS @ aff
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    sitk.WriteImage(img, str(p), useCompression=True)


def write_label_like(path: str | Path, label: np.ndarray, reference: Image) -> Path:
    """Write a label map in the exact geometry of ``reference``.

    Args:
        path: destination file.
        label: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` integer labels on the reference's voxel grid.
        reference: the source image (shape, affine and header codes are copied).

    Raises:
        ImageWriteError: the label's shape differs from the reference's spatial shape.
    """
    lab = np.asarray(label)
    if lab.ndim == 4:
        lab = lab[0]
    if tuple(lab.shape) != reference.spatial_shape:
        raise ImageWriteError(
            f"{path}: label shape {lab.shape} differs from the reference image's "
            f"{reference.spatial_shape}; resample the label onto the reference grid first"
        )
    dtype = np.uint8 if lab.max(initial=0) < 256 and lab.min(initial=0) >= 0 else np.int16
    return write_image(path, lab.astype(dtype), reference.affine, reference=reference)


def world_coordinates(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (RAS, mm) coordinates of the 8 corner voxels of a grid: a cheap geometry key."""
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[2] - 1)
        ]
    )
    return (affine @ corners.T).T[:, :3]
