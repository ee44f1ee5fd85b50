"""Synthetic brain anatomy for :mod:`fedmed.data.synth`: template, deformation, lesions.

A subject is the MNI152 2009 template (shipped inside the ``nilearn`` wheel, read offline)
warped by a random smooth deformation, with synthetic white-matter lesions painted in
template space. Everything here works on world coordinates (RAS, mm): a caller asks for the
tissue probabilities at any set of world points (a scanner's voxel centres, or a fine
reference grid) and gets them by pulling the template back through the inverse deformation
with :func:`scipy.ndimage.map_coordinates`. Sampling straight from the template onto the
requested points means an image is never resampled twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

# Tissue classes in label order (0 is background, implicit: 1 - sum of the others).
TISSUES = ("CSF", "GM", "WM", "lesion")

# Mean template T1 intensity of pure CSF / GM / WM (measured on the 2009 template, voxels
# with probability > 0.9); the ratio of the template T1 to this model is the texture.
_TEMPLATE_T1_MEANS = np.array([0.28, 0.65, 0.87], dtype=np.float32)


@dataclass(frozen=True)
class Template:
    """The MNI152 template as arrays on its 1 mm (or 2 mm) grid.

    Attributes:
        t1: template T1 intensities, ``(X, Y, Z)`` float32 in [0, 1].
        probs: ``(3, X, Y, Z)`` float32 CSF, GM, WM probabilities.
        inside: ``(X, Y, Z)`` bool, the brain dilated by a few voxels: outside it every
            probability is 0, so sampling can skip those points.
        affine: voxel -> MNI world (mm).
        inv_affine: its inverse.
        centre: centre of the brain's bounding box (mm).
        half_extent: half the size of the brain's bounding box (mm).
        deep_wm: ``(N, 3)`` world points of deep white matter (lesion centres).
        periventricular: ``(M, 3)`` world points of white matter next to the ventricles.
    """

    t1: np.ndarray
    probs: np.ndarray
    inside: np.ndarray
    affine: np.ndarray
    inv_affine: np.ndarray
    centre: np.ndarray
    half_extent: np.ndarray
    deep_wm: np.ndarray
    periventricular: np.ndarray


@lru_cache(maxsize=2)
def load_template(resolution: int = 1) -> Template:
    """Load the MNI152 2009 template and its tissue maps from the ``nilearn`` wheel.

    Cached per process: every subject of a federation is drawn from the same arrays.

    Args:
        resolution: 1 or 2 (mm). 1 mm loads faster (2 mm is resampled by nilearn).

    Returns:
        The :class:`Template`.
    """
    from nilearn import datasets

    def load(img: Any) -> np.ndarray:
        return np.asarray(img.get_fdata(dtype=np.float32))

    t1_img = datasets.load_mni152_template(resolution=resolution)
    t1 = load(t1_img)
    gm = load(datasets.load_mni152_gm_template(resolution=resolution))
    wm = load(datasets.load_mni152_wm_template(resolution=resolution))
    mask = load(datasets.load_mni152_brain_mask(resolution=resolution))
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    # The tissue maps spill slightly past the mask; the brain is their union.
    brain = np.clip(np.maximum(mask, gm + wm), 0, 1)
    csf = np.clip(brain - gm - wm, 0, 1)
    probs = np.stack([csf, gm, wm]).astype(np.float32)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    inside = ndimage.binary_dilation(brain > 0, iterations=2)

    idx = np.argwhere(brain > 0)
    lo = affine[:3, :3] @ idx.min(0) + affine[:3, 3]
    hi = affine[:3, :3] @ idx.max(0) + affine[:3, 3]

    # Ventricles: CSF deep inside the brain (far from its outer surface). Distances on a
    # 2x coarser grid keep the one-off cost small.
    step = 2 if resolution == 1 else 1
    vox = float(np.linalg.norm(affine[:3, 0])) * step
    depth = ndimage.distance_transform_edt(brain[::step, ::step, ::step] > 0.5) * vox
    ventricles = (csf[::step, ::step, ::step] > 0.5) & (depth > 18.0)
    to_vent = ndimage.distance_transform_edt(~ventricles) * vox
    wm_c = wm[::step, ::step, ::step]
    deep = (wm_c > 0.9) & (depth > 8.0)
    peri = deep & (to_vent < 9.0)

    def world(m: np.ndarray) -> np.ndarray:
        ijk = np.argwhere(m) * step
        return (ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float64)

    return Template(
        t1=np.clip(t1, 0, None).astype(np.float32),
        probs=probs,
        inside=inside,
        affine=affine,
        inv_affine=np.linalg.inv(affine),
        centre=(lo + hi) / 2,
        half_extent=(hi - lo) / 2,
        deep_wm=world(deep),
        periventricular=world(peri),
    )


@dataclass(frozen=True)
class Blob:
    """One lesion: an irregular ellipsoid in template (MNI) space."""

    centre: np.ndarray
    radius: float
    rotation: np.ndarray
    """``(3, 3)``: columns are the ellipsoid's axes."""
    axes: np.ndarray
    """Relative semi-axis lengths (mean 1)."""
    wave_dirs: np.ndarray
    """``(K, 3)`` unit vectors of the radial modulation (the 'smooth noise')."""
    wave_freq: np.ndarray
    wave_phase: np.ndarray
    wave_amp: np.ndarray

    def membership(self, pts: np.ndarray) -> np.ndarray:
        """Soft membership in [0, 1] of template-space points ``(N, 3)`` (1 mm soft edge)."""
        y = (pts - self.centre) @ self.rotation / self.axes
        rho = np.linalg.norm(y, axis=1)
        d = y / np.maximum(rho, 1e-6)[:, None]
        wobble = (self.wave_amp * np.sin(d @ self.wave_dirs.T * self.wave_freq + self.wave_phase))
        r_eff = self.radius * (1.0 + wobble.sum(axis=1))
        return np.clip(0.5 + (r_eff - rho), 0.0, 1.0)


@dataclass(frozen=True)
class Anatomy:
    """One subject: deformation of the template plus lesions and tissue contrast jitter.

    The deformation maps subject world -> template world:
    ``x_t = centre + M (x_s - centre - translation) + u(x_s)`` where ``M`` is the inverse of
    the random rotation-scaling and ``u`` a low-frequency displacement field (sum of a few
    plane waves; exact at any point, so any grid samples the same continuous subject).
    """

    centre: np.ndarray
    matrix: np.ndarray
    translation: np.ndarray
    wave_k: np.ndarray
    """``(3, K, 3)``: wave vectors per displacement component."""
    wave_phase: np.ndarray
    wave_amp: np.ndarray
    blobs: tuple[Blob, ...]
    tissue_jitter: np.ndarray
    """``(4,)`` multiplicative jitter of the CSF, GM, WM, lesion signals."""

    def to_template(self, pts: np.ndarray) -> np.ndarray:
        """Template world coordinates ``(N, 3)`` of subject world points ``(N, 3)``."""
        out = (pts - self.centre - self.translation) @ self.matrix.T + self.centre
        # float32 for the waves: numpy's vectorised float32 sine is ~30x faster than
        # float64, and a few mm of smooth displacement need no more precision.
        n_waves = self.wave_k.shape[1]
        k = self.wave_k.reshape(-1, 3).T.astype(np.float32)
        phase = pts.astype(np.float32) @ k + self.wave_phase.reshape(-1).astype(np.float32)
        amp = np.zeros((3 * n_waves, 3), dtype=np.float32)
        for c in range(3):
            amp[c * n_waves:(c + 1) * n_waves, c] = self.wave_amp[c]
        out += np.sin(phase) @ amp
        return out


def random_anatomy(
    rng_deform: np.random.Generator,
    rng_lesion: np.random.Generator,
    rng_tissue: np.random.Generator,
    template: Template,
    lesion_load: float,
    *,
    max_rotation_deg: float = 8.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_translation_mm: float = 4.0,
    displacement_mm: float = 3.0,
    max_lesions: int = 12,
) -> Anatomy:
    """Draw a subject: deformation, lesions and tissue jitter from three independent streams.

    Independent streams keep the deformation of a subject seed the same whatever its
    lesion load, so one subject scanned at two sites has the same brain.

    Args:
        rng_deform: draws the affine and the displacement field.
        rng_lesion: draws the lesion count, positions and shapes.
        rng_tissue: draws the per-tissue signal jitter.
        template: the template.
        lesion_load: mean number of lesions (site-dependent).
        max_rotation_deg: largest rotation angle (degrees) of the head.
        scale_range: range of the global brain scaling.
        max_translation_mm: largest translation per axis (mm).
        displacement_mm: typical peak of the smooth displacement field (mm).
        max_lesions: cap on the lesion count.

    Returns:
        The subject's :class:`Anatomy`.
    """
    axis = rng_deform.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng_deform.uniform(0.0, max_rotation_deg))
    rot = Rotation.from_rotvec(axis * angle).as_matrix()
    scale = rng_deform.uniform(*scale_range) * rng_deform.uniform(0.97, 1.03, size=3)
    forward = rot @ np.diag(scale)
    translation = rng_deform.uniform(-max_translation_mm, max_translation_mm, size=3)
    n_waves = 3
    dirs = rng_deform.normal(size=(3, n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    wavelength = rng_deform.uniform(70.0, 150.0, size=(3, n_waves, 1))
    wave_k = dirs * (2 * np.pi / wavelength)
    wave_phase = rng_deform.uniform(0, 2 * np.pi, size=(3, n_waves))
    wave_amp = rng_deform.uniform(0.3, 1.0, size=(3, n_waves)) * displacement_mm / n_waves * 1.5

    return Anatomy(
        centre=template.centre.copy(),
        matrix=np.linalg.inv(forward),
        translation=translation,
        wave_k=wave_k,
        wave_phase=wave_phase,
        wave_amp=wave_amp,
        blobs=random_lesions(rng_lesion, template, lesion_load, max_lesions),
        tissue_jitter=rng_tissue.uniform(0.95, 1.05, size=4),
    )


def random_lesions(
    rng: np.random.Generator, template: Template, lesion_load: float, max_lesions: int = 12
) -> tuple[Blob, ...]:
    """Draw a subject's lesions: count, then per lesion its place and irregular shape.

    Args:
        rng: the subject's lesion stream.
        template: the template (periventricular and deep white-matter seed points).
        lesion_load: mean number of lesions (site-dependent).
        max_lesions: cap on the lesion count.
    """
    # Over-dispersed count: a gamma-mixed Poisson, so some subjects have none and a few many.
    rate = lesion_load * rng.gamma(2.0, 0.5) if lesion_load > 0 else 0.0
    n_lesions = int(min(max_lesions, rng.poisson(rate)))
    blobs = []
    for _ in range(n_lesions):
        pool = template.periventricular if rng.random() < 0.65 else template.deep_wm
        centre = pool[rng.integers(len(pool))] + rng.uniform(-1, 1, size=3)
        k = 3
        wdirs = rng.normal(size=(k, 3))
        wdirs /= np.linalg.norm(wdirs, axis=1, keepdims=True)
        axes = rng.uniform(0.65, 1.35, size=3)
        blobs.append(
            Blob(
                centre=centre,
                radius=float(rng.uniform(2.0, 7.0)),
                rotation=Rotation.random(random_state=rng).as_matrix(),
                axes=axes / np.cbrt(np.prod(axes)),
                wave_dirs=wdirs,
                wave_freq=rng.uniform(1.5, 3.5, size=k),
                wave_phase=rng.uniform(0, 2 * np.pi, size=k),
                wave_amp=rng.uniform(0.05, 0.15, size=k),
            )
        )
    return tuple(blobs)


def sample_tissues(
    anatomy: Anatomy, template: Template, pts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue probabilities and T1 texture of a subject at world points.

    Args:
        anatomy: the subject.
        template: the template it was drawn from.
        pts: ``(N, 3)`` subject world points (RAS, mm).

    Returns:
        ``probs`` ``(4, N)`` float32 CSF, GM, WM, lesion probabilities (background is
        ``1 - sum``), and ``texture`` ``(N,)`` float32: the template T1 divided by its
        tissue model (1 where there is no brain), the fine anatomy the tissue maps miss.
    """
    n = pts.shape[0]
    probs = np.zeros((4, n), dtype=np.float32)
    texture = np.ones(n, dtype=np.float32)
    tpts = anatomy.to_template(pts)
    vox = tpts @ template.inv_affine[:3, :3].T + template.inv_affine[:3, 3]
    # Cheap nearest-voxel test first: interpolation is only needed near the brain.
    near = np.rint(vox).astype(np.int64)
    shape = np.array(template.inside.shape)
    inb = np.all((near >= 0) & (near < shape), axis=1)
    idx = np.flatnonzero(inb)
    idx = idx[template.inside[near[idx, 0], near[idx, 1], near[idx, 2]]]
    if idx.size == 0:
        return probs, texture
    coords = np.ascontiguousarray(vox[idx].T)
    for c in range(3):
        probs[c, idx] = ndimage.map_coordinates(
            template.probs[c], coords, order=1, mode="constant", cval=0.0, output=np.float32
        )
    t1 = ndimage.map_coordinates(
        template.t1, coords, order=1, mode="constant", cval=0.0, output=np.float32
    )
    model = _TEMPLATE_T1_MEANS @ probs[:3, idx]
    brainy = model > 0.15
    texture[idx[brainy]] = np.clip(t1[brainy] / model[brainy], 0.75, 1.25)

    if anatomy.blobs:
        wm_idx = idx[probs[2, idx] > 0.0]
        wpts = tpts[wm_idx]
        member = np.zeros(wm_idx.size, dtype=np.float32)
        for blob in anatomy.blobs:
            reach = blob.radius * 1.6 * float(blob.axes.max()) + 1.0
            close = np.flatnonzero(np.sum((wpts - blob.centre) ** 2, axis=1) < reach**2)
            if close.size:
                member[close] = np.maximum(member[close], blob.membership(wpts[close]))
        if wm_idx.size:
            # Lesions live in white matter: they take over (part of) its probability.
            les = member * probs[2, wm_idx]
            probs[3, wm_idx] = les
            probs[2, wm_idx] -= les
    return probs, texture


def labels_from_probs(probs: np.ndarray) -> np.ndarray:
    """Hard labels (0 background, 1 CSF, 2 GM, 3 WM, 4 lesion) by the largest probability.

    Args:
        probs: ``(4, ...)`` CSF, GM, WM, lesion probabilities.

    Returns:
        ``(...)`` uint8 labels.
    """
    bg = np.clip(1.0 - probs.sum(axis=0), 0.0, 1.0)
    return np.argmax(np.concatenate([bg[None], probs]), axis=0).astype(np.uint8)
