"""Segmentation metrics (MONAI): Dice, HD95, sensitivity and specificity per class.

Inputs are integer label maps of one case, ``(X, Y, Z)`` or ``(1, X, Y, Z)``; every metric
is computed per foreground class (background excluded). A class absent from both the
prediction and the reference counts as Dice 1 (nothing to find, nothing found); HD95 is
undefined there and left out of means (NaN).

Uncertainty over cases (a site's few test cases): :func:`case_dice_means` and
:func:`bootstrap_ci`, shared by the site's final round and ``fedmed compare``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def _one_hot(label: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(label, dtype=np.int64))  # copies read-only memory maps
    if t.ndim == 4:
        t = t[0]
    return torch.nn.functional.one_hot(t, num_classes).permute(3, 0, 1, 2)[None].float()


@dataclass(frozen=True)
class CaseMetrics:
    """Per-class metrics of one case (foreground classes only, keyed by class index)."""

    case_id: str
    dice: dict[int, float]
    hd95: dict[int, float]
    sensitivity: dict[int, float]
    specificity: dict[int, float]


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    case_id: str = "",
    spacing: tuple[float, float, float] | None = None,
    hd95: bool = True,
) -> CaseMetrics:
    """Dice, HD95 (mm when ``spacing`` is given), sensitivity and specificity per class.

    Args:
        pred: predicted labels ``(X, Y, Z)`` or ``(1, X, Y, Z)``.
        target: reference labels, same shape.
        num_classes: including background.
        case_id: carried into the result.
        spacing: voxel size in mm for HD95; voxels when ``None``.
        hd95: compute HD95 (the costly part); NaN when ``False``.
    """
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix
    from monai.metrics.hausdorff_distance import compute_hausdorff_distance
    from monai.metrics.meandice import compute_dice

    p, t = _one_hot(pred, num_classes), _one_hot(target, num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)[0]
    conf = get_confusion_matrix(p, t, include_background=False)
    sens = compute_confusion_matrix_metric("sensitivity", conf)[0]
    spec = compute_confusion_matrix_metric("specificity", conf)[0]
    out_hd: dict[int, float] = {}
    for c in range(1, num_classes):
        if not hd95 or p[0, c].sum() == 0 or t[0, c].sum() == 0:
            out_hd[c] = math.nan
            continue
        with warnings.catch_warnings():
            # MONAI 1.6's own HD95 passes its deprecated `always_return_as_numpy`.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd = compute_hausdorff_distance(
                p[:, c : c + 1],
                t[:, c : c + 1],
                include_background=True,
                percentile=95,
                spacing=list(spacing) if spacing is not None else None,
            )
        out_hd[c] = float(hd.reshape(-1)[0])
    return CaseMetrics(
        case_id=case_id,
        dice={c: float(dice[c - 1]) for c in range(1, num_classes)},
        hd95=out_hd,
        sensitivity={c: float(sens[c - 1]) for c in range(1, num_classes)},
        specificity={c: float(spec[c - 1]) for c in range(1, num_classes)},
    )


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if not math.isinf(v)], dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return math.nan
    return float(np.nanmean(arr))


@dataclass(frozen=True)
class EvalResult:
    """Metrics over a set of cases: means per class and over classes, plus each case's."""

    dice_mean: float
    dice_per_class: dict[str, float]
    hd95_mean: float
    hd95_per_class: dict[str, float]
    sensitivity: dict[str, float]
    specificity: dict[str, float]
    num_cases: int
    per_case: list[CaseMetrics] = field(default_factory=list)

    def as_dict(self, with_cases: bool = False) -> dict[str, object]:
        """JSON-ready form (NaN becomes ``None``)."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 5)

        out: dict[str, object] = {
            "dice_mean": clean(self.dice_mean),
            "dice_per_class": {k: clean(v) for k, v in self.dice_per_class.items()},
            "hd95_mean": clean(self.hd95_mean),
            "hd95_per_class": {k: clean(v) for k, v in self.hd95_per_class.items()},
            "sensitivity": {k: clean(v) for k, v in self.sensitivity.items()},
            "specificity": {k: clean(v) for k, v in self.specificity.items()},
            "num_cases": self.num_cases,
        }
        if with_cases:
            out["per_case"] = [
                {"case_id": c.case_id, "dice": {str(k): clean(v) for k, v in c.dice.items()}}
                for c in self.per_case
            ]
        return out


def summarize(cases: list[CaseMetrics], class_names: Mapping[int, str]) -> EvalResult:
    """Means over cases per class, and the mean over foreground classes.

    Args:
        cases: per-case metrics.
        class_names: label value -> name (background included; it is skipped).
    """
    fg = [c for c in sorted(class_names) if c != 0]

    def per_class(attr: str) -> dict[str, float]:
        return {class_names[c]: _nanmean(getattr(m, attr)[c] for m in cases) for c in fg}

    dice = per_class("dice")
    hd = per_class("hd95")
    return EvalResult(
        dice_mean=_nanmean(dice.values()),
        dice_per_class=dice,
        hd95_mean=_nanmean(hd.values()),
        hd95_per_class=hd,
        sensitivity=per_class("sensitivity"),
        specificity=per_class("specificity"),
        num_cases=len(cases),
        per_case=cases,
    )


def case_dice_means(result: EvalResult) -> list[float]:
    """Each case's Dice averaged over the foreground classes (what a bootstrap resamples)."""
    return [_nanmean(c.dice.values()) for c in result.per_case]


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The mean of ``values`` and a percentile-bootstrap confidence interval for it.

    Cases are resampled with replacement (``scipy.stats.bootstrap``, percentile method,
    seeded so that the interval is reproducible). With a handful of cases the interval is
    wide and, if anything, too narrow: read it as the least uncertainty there is.

    Args:
        values: one value per case (e.g. :func:`case_dice_means`); NaN values are dropped.
        confidence: the interval's confidence level.
        resamples: bootstrap resamples.
        seed: the resampling's seed.

    Returns:
        ``(mean, low, high)``; all three the mean when fewer than two values are left or
        they are all equal (nothing to resample), NaN when none is left.
    """
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if arr.size < 2 or np.all(arr == arr[0]):
        return mean, mean, mean
    from scipy.stats import bootstrap

    res = bootstrap((arr,), np.mean, confidence_level=confidence, n_resamples=resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return mean, min(low, mean), max(high, mean)
