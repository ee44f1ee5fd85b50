"""Scanners and subjects for :mod:`fedmed.data.synth`.

A :class:`ScannerProfile` is how one site acquires and stores images; :func:`simulate_subject`
samples a synthetic subject (:mod:`fedmed.data.synth_anatomy`) straight onto a scanner's
voxel grid and turns its partial-volume tissue probabilities into T1, T2 and FLAIR with the
scanner's bias field, noise, contrast and intensity scale.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fedmed.data.io import Image
from fedmed.data.synth_anatomy import (
    Anatomy,
    Template,
    labels_from_probs,
    load_template,
    random_anatomy,
    sample_tissues,
)
from fedmed.errors import ConfigError

MODALITIES = ("T1", "T2", "FLAIR")
# Relative tissue signals (CSF, GM, WM, lesion), WM T1 = 1, and how strongly each
# modality follows the template T1 texture (exponent of the texture ratio).
_CONTRAST: dict[str, tuple[tuple[float, float, float, float], float]] = {
    "T1": ((0.30, 0.72, 1.00, 0.50), 1.0),
    "T2": ((2.20, 1.15, 0.80, 1.70), -0.5),
    "FLAIR": ((0.12, 1.00, 0.70, 1.90), -0.3),
}

SiteFormat = Literal["msd", "nnunet", "folder"]


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner acquires and stores images.

    Attributes:
        name: site name (also the folder name).
        format: on-disk dataset layout (see :mod:`fedmed.data.formats`).
        spacing: voxel size (mm) along the on-disk array axes.
        orientation: nibabel axis codes of the on-disk array axes (e.g. ``"LPS"``).
        fov_mm: field of view (mm) along world R-L, A-P, S-I.
        intensity_scale: stored value of white matter in T1 (arbitrary scanner units).
        intensity_offset: added to every stored value.
        bias_strength: amplitude of the log multiplicative bias field.
        noise_level: noise sigma relative to the white-matter T1 signal.
        noise: ``rician`` (magnitude images) or ``gaussian``.
        cohort_weight: relative number of cases (skews cohort sizes across sites).
        lesion_load: mean number of lesions per subject.
        modalities: modalities this site acquires.
        contrast_gamma: exponent on the signal; scanners differ slightly in contrast.
        position_jitter_mm: random offset of the field of view per subject (mm).
    """

    name: str
    format: SiteFormat = "folder"
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    fov_mm: tuple[float, float, float] = (176.0, 216.0, 176.0)
    intensity_scale: float = 1000.0
    intensity_offset: float = 0.0
    bias_strength: float = 0.15
    noise_level: float = 0.03
    noise: Literal["rician", "gaussian"] = "rician"
    cohort_weight: float = 1.0
    lesion_load: float = 5.0
    modalities: tuple[str, ...] = MODALITIES
    contrast_gamma: float = 1.0
    position_jitter_mm: float = 3.0

    def scaled(self, factor: float) -> ScannerProfile:
        """The same scanner with voxels ``factor`` times larger (tiny volumes for tests)."""
        return replace(self, spacing=tuple(s * factor for s in self.spacing))  # type: ignore[arg-type]

    def _axes(self) -> np.ndarray:
        import nibabel as nib

        try:
            return nib.orientations.axcodes2ornt(tuple(self.orientation))
        except Exception:
            raise ConfigError(
                f"scanner {self.name}: orientation {self.orientation!r} is not three axis "
                "codes like 'RAS', 'LPS' or 'LIA'"
            ) from None

    def grid_shape(self) -> tuple[int, int, int]:
        """Voxel counts along the on-disk axes."""
        ornt = self._axes()
        return tuple(  # type: ignore[return-value]
            max(2, int(round(self.fov_mm[int(ornt[a, 0])] / self.spacing[a]))) for a in range(3)
        )

    def grid(self, centre: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
        """Voxel grid centred on world point ``centre``: ``(shape, voxel->RAS affine)``."""
        ornt = self._axes()
        shape = self.grid_shape()
        aff = np.zeros((4, 4))
        aff[3, 3] = 1.0
        for a in range(3):
            aff[int(ornt[a, 0]), a] = ornt[a, 1] * self.spacing[a]
        aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
        return shape, aff


@dataclass(frozen=True)
class SyntheticSubject:
    """One simulated subject as a scanner acquired it.

    Attributes:
        images: modality -> :class:`~fedmed.data.io.Image` ``(1, X, Y, Z)`` float32 on the
            scanner grid (values as stored on disk), RAS affine.
        label: ``(1, X, Y, Z)`` uint8 labels on the scanner grid.
        reference_label: the same subject's ground truth on a fine isotropic RAS grid in
            world space (``None`` unless asked for), to score any resampled label.
        num_lesions: lesions drawn for this subject.
        seed: the subject seed.
    """

    images: dict[str, Image]
    label: Image
    reference_label: Image | None
    num_lesions: int
    seed: int


def default_scanners(num_sites: int = 4, seed: int = 0) -> list[ScannerProfile]:
    """The training sites' scanners.

    The first four are fixed (isotropic 1.5 mm RAS MSD; 1.5x1.5x3 mm thick-slice LPS
    nnU-Net without FLAIR; 1.8 mm LIA folder-per-case; 2 mm PIR MSD); further sites are
    drawn from ``seed`` with formats cycling MSD, nnU-Net, folder.

    Args:
        num_sites: number of training sites (>= 1).
        seed: draws the profiles of sites beyond the fourth.

    Raises:
        ConfigError: ``num_sites`` < 1.
    """
    if num_sites < 1:
        raise ConfigError(f"number of sites must be at least 1, got {num_sites}")
    base = [
        ScannerProfile(
            "hospital-a", "msd", (1.5, 1.5, 1.5), "RAS", (176, 216, 176), 1000.0, 0.0,
            0.12, 0.025, "rician", 1.6, 5.0,
        ),
        ScannerProfile(
            "hospital-b", "nnunet", (1.5, 1.5, 3.0), "LPS", (172, 212, 180), 600.0, 0.0,
            0.25, 0.04, "rician", 1.0, 3.0, ("T1", "T2"), 1.08,
        ),
        ScannerProfile(
            "hospital-c", "folder", (1.8, 1.8, 1.8), "LIA", (180, 220, 180), 2500.0, 100.0,
            0.18, 0.035, "gaussian", 0.8, 7.0, MODALITIES, 0.94,
        ),
        ScannerProfile(
            "hospital-d", "msd", (2.0, 2.0, 2.0), "PIR", (184, 224, 184), 300.0, 20.0,
            0.3, 0.05, "rician", 0.6, 9.0, MODALITIES, 1.04,
        ),
    ]
    formats: tuple[SiteFormat, ...] = ("msd", "nnunet", "folder")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7331]))
    spacings = [(1.2, 1.2, 1.2), (1.5, 1.5, 1.5), (1.6, 1.6, 2.5), (1.8, 1.8, 1.8), (2.0, 2.0, 2.0)]
    orients = ["RAS", "LPS", "LAS", "RPI", "LIA", "PIR", "ASL"]
    out = base[:num_sites]
    for i in range(len(out), num_sites):
        fov = rng.uniform(174, 190, size=3) + np.array([0.0, 40.0, 0.0])
        out.append(
            ScannerProfile(
                name=f"hospital-{_letters(i)}",
                format=formats[i % 3],
                spacing=spacings[int(rng.integers(len(spacings)))],
                orientation=orients[int(rng.integers(len(orients)))],
                fov_mm=tuple(float(round(v)) for v in fov),  # type: ignore[arg-type]
                intensity_scale=float(round(rng.uniform(200, 3000))),
                intensity_offset=float(round(rng.uniform(0, 100))),
                bias_strength=float(round(rng.uniform(0.1, 0.3), 2)),
                noise_level=float(round(rng.uniform(0.02, 0.05), 3)),
                noise="rician" if rng.random() < 0.7 else "gaussian",
                cohort_weight=float(round(rng.uniform(0.5, 1.5), 2)),
                lesion_load=float(round(rng.uniform(2, 9), 1)),
                contrast_gamma=float(round(rng.uniform(0.92, 1.08), 2)),
            )
        )
    return out


def unseen_scanner() -> ScannerProfile:
    """A scanner no training site has: thick sagittal slices, LSA axes, another scale."""
    return ScannerProfile(
        "unseen-scanner", "folder", (3.0, 1.4, 1.4), "LSA", (184, 224, 184), 4000.0, 0.0,
        0.22, 0.045, "rician", 1.0, 6.0, MODALITIES, 1.1, 4.0,
    )


def _letters(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return s


def subject_seed(seed: int, group: int, index: int) -> int:
    """The seed of case ``index`` of site/group ``group``: independent of generation order."""
    return int(np.random.SeedSequence([seed, group, index]).generate_state(1, np.uint32)[0])


def _grid_points(shape: tuple[int, int, int], affine: np.ndarray, offset: np.ndarray) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T + offset
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _supersample_offsets(spacing: Sequence[float]) -> list[np.ndarray]:
    """Sub-voxel offsets that model a thick slice's profile (its partial volume)."""
    finest = min(spacing)
    per_axis = []
    for s in spacing:
        n = max(1, int(round(s / finest))) if s > 1.5 * finest else 1
        per_axis.append((np.arange(n) + 0.5) / n - 0.5)
    return [np.array([a, b, c]) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def _sample_grid(
    anatomy: Anatomy, template: Template, shape: tuple[int, int, int], affine: np.ndarray,
    spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume probabilities ``(4, N)`` and texture ``(N,)`` averaged over each voxel."""
    offsets = _supersample_offsets(spacing)
    probs, texture = sample_tissues(anatomy, template, _grid_points(shape, affine, offsets[0]))
    for off in offsets[1:]:
        p, t = sample_tissues(anatomy, template, _grid_points(shape, affine, off))
        probs += p
        texture += t
    return probs / len(offsets), texture / len(offsets)


def _bias_field(rng: np.random.Generator, pts: np.ndarray, centre: np.ndarray,
                strength: float) -> np.ndarray:
    """A smooth log-bias field (a few long plane waves) evaluated at world points."""
    rel = (pts - centre).astype(np.float32)
    field_ = np.zeros(pts.shape[0], dtype=np.float32)
    for _ in range(3):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        k = (d * 2 * np.pi / rng.uniform(180.0, 320.0)).astype(np.float32)
        amp, phase = rng.uniform(0.5, 1.0), rng.uniform(0, 2 * np.pi)
        field_ += np.float32(amp) * np.cos(rel @ k + np.float32(phase))
    return field_ * np.float32(strength / 1.5)


def simulate_subject(
    seed: int,
    scanner: ScannerProfile,
    *,
    lesion_load: float | None = None,
    reference_spacing: float | None = 1.0,
    template_resolution: int = 1,
) -> SyntheticSubject:
    """Simulate one subject scanned by ``scanner``.

    The anatomy (deformation, lesions, tissue jitter) depends on ``seed`` only (and the
    lesion count on ``lesion_load``), so the same seed at two scanners is the same brain;
    the acquisition (field-of-view position, bias, noise) also depends on the scanner.

    Args:
        seed: subject seed.
        scanner: the acquiring scanner.
        lesion_load: mean lesion count; default the scanner's.
        reference_spacing: sample the ground-truth label on an isotropic RAS grid of this
            spacing (mm) covering any deformed brain, into ``reference_label``; ``None``
            skips it (1 mm costs a few seconds).
        template_resolution: MNI152 resolution (1 or 2 mm) to draw from.

    Returns:
        The :class:`SyntheticSubject`.
    """
    template = load_template(template_resolution)
    ss = np.random.SeedSequence([seed, 0])
    rng_def, rng_les, rng_tis = (np.random.default_rng(s) for s in ss.spawn(3))
    load = scanner.lesion_load if lesion_load is None else lesion_load
    anatomy = random_anatomy(rng_def, rng_les, rng_tis, template, load)
    rng_acq = np.random.default_rng(
        np.random.SeedSequence([seed, 1, zlib.crc32(scanner.name.encode())])
    )

    centre = template.centre + rng_acq.uniform(-1, 1, 3) * scanner.position_jitter_mm
    shape, affine = scanner.grid(centre)
    probs, texture = _sample_grid(anatomy, template, shape, affine, scanner.spacing)
    label = labels_from_probs(probs).reshape(shape)

    pts = _grid_points(shape, affine, np.zeros(3))
    log_bias = _bias_field(rng_acq, pts, centre, scanner.bias_strength)
    del pts
    images: dict[str, Image] = {}
    for mod in MODALITIES:
        # Draw every modality's randomness even when the scanner skips it, so a scanner's
        # remaining modalities do not depend on which ones it acquires.
        mod_bias = rng_acq.uniform(0.7, 1.3)
        noise_seed = int(rng_acq.integers(2**63))
        if mod not in scanner.modalities:
            continue
        means, tex_power = _CONTRAST[mod]
        weights = (np.array(means) * anatomy.tissue_jitter).astype(np.float32)
        signal = (weights @ probs) * texture**tex_power
        signal = np.power(np.maximum(signal, 0), scanner.contrast_gamma, dtype=np.float32)
        signal *= np.exp(log_bias * mod_bias).astype(np.float32)
        sigma = scanner.noise_level
        nrng = np.random.default_rng(noise_seed)
        n1 = nrng.standard_normal(signal.size, dtype=np.float32) * sigma
        if scanner.noise == "rician":
            n2 = nrng.standard_normal(signal.size, dtype=np.float32) * sigma
            signal = np.sqrt((signal + n1) ** 2 + n2**2)
        else:
            signal = signal + n1
        stored = np.rint(signal * scanner.intensity_scale + scanner.intensity_offset)
        stored = np.clip(stored, -32768, 32767).astype(np.float32).reshape(shape)
        images[mod] = Image(stored[None], affine.copy())

    reference = None
    if reference_spacing is not None:
        reference = _reference_label(anatomy, template, reference_spacing)
    return SyntheticSubject(
        images=images,
        label=Image(label[None], affine.copy()),
        reference_label=reference,
        num_lesions=len(anatomy.blobs),
        seed=seed,
    )


def _reference_label(anatomy: Anatomy, template: Template, spacing: float) -> Image:
    """Ground truth on an isotropic RAS grid covering any deformed brain (chunked)."""
    margin = 30.0  # covers the largest scaling, rotation, translation and displacement
    lo = template.centre - template.half_extent - margin
    shape = tuple(int(np.ceil(2 * (h + margin) / spacing)) + 1 for h in template.half_extent)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    n = int(np.prod(shape))
    out = np.zeros(n, dtype=np.uint8)
    ijk_all = np.indices(shape, dtype=np.float64).reshape(3, -1).T  # type: ignore[arg-type]
    chunk = 1 << 20
    for start in range(0, n, chunk):
        pts = ijk_all[start:start + chunk] @ affine[:3, :3].T + affine[:3, 3]
        probs, _ = sample_tissues(anatomy, template, pts)
        out[start:start + chunk] = labels_from_probs(probs)
    return Image(out.reshape(shape)[None], affine)
