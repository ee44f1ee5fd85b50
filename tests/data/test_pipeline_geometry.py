"""Acceptance: the preprocessing pipeline keeps every synthetic scanner's labels in place.

For one simulated subject per default scanner (RAS, LPS thick-slice, LIA, PIR grids), the
label carried through :func:`preprocess_images` must match, in world space, the subject's
ground truth (sampled on a fine RAS grid) resampled directly onto the same preprocessed grid.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedmed.data.geometry import resample_label_to
from fedmed.data.planning import PreprocessSettings
from fedmed.data.preprocess import preprocess_images

os.environ.setdefault("OMP_NUM_THREADS", "1")

synth = pytest.importorskip("fedmed.data.synth")
if not all(hasattr(synth, n) for n in ("simulate_subject", "default_scanners")):
    pytest.skip(
        "fedmed.data.synth has no simulate_subject/default_scanners yet", allow_module_level=True
    )

SCALE = 2.0
"""Voxels twice the scanners' size (3-4 mm, 6 mm slices): small and quick, still realistic."""


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.mark.slow
def test_preprocessed_labels_match_ground_truth_in_world_space():
    modalities = tuple(synth.MODALITIES)
    settings = PreprocessSettings(
        modalities=modalities,
        target_spacing=tuple(s * SCALE for s in synth.TARGET_SPACING),
        patch_size=(16, 16, 16),
    )
    scanners = synth.default_scanners(4, seed=0)
    assert len({s.orientation for s in scanners}) >= 3
    for scanner in scanners:
        subject = synth.simulate_subject(
            5, scanner.scaled(SCALE), reference_spacing=2.0, template_resolution=2
        )
        pre = preprocess_images(subject.images, settings, subject.label, case_id=scanner.name)
        assert pre.spacing == pytest.approx(settings.target_spacing, rel=1e-4)
        assert pre.available.tolist() == [m in subject.images for m in modalities]
        ref = subject.reference_label
        truth = resample_label_to(ref.array, ref.affine, pre.affine, pre.spatial_shape)
        got = pre.label[0]
        foreground = _dice(got > 0, truth > 0)
        assert foreground >= 0.95, f"{scanner.name}: foreground Dice {foreground:.3f}"
        # Tissue classes (GM 2, WM 3) are thick enough at these voxel sizes to check too.
        for c in (2, 3):
            d = _dice(got == c, truth == c)
            assert d >= 0.75, f"{scanner.name}: class {c} Dice {d:.3f}"
