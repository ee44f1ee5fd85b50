import math

import numpy as np
import pytest

from fedmed.training.metrics import case_metrics, summarize


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 4, size=(12, 10, 8))
    pred = np.where(rng.random(target.shape) < 0.8, target, rng.integers(0, 4, size=target.shape))
    m = case_metrics(pred, target, num_classes=4)
    for c in (1, 2, 3):
        assert m.dice[c] == pytest.approx(numpy_dice(pred == c, target == c), abs=1e-6)
        tp = np.logical_and(pred == c, target == c).sum()
        assert m.sensitivity[c] == pytest.approx(tp / (target == c).sum(), abs=1e-6)
        tn = np.logical_and(pred != c, target != c).sum()
        assert m.specificity[c] == pytest.approx(tn / (target != c).sum(), abs=1e-6)


def test_absent_class_counts_as_perfect_dice_and_undefined_hd95() -> None:
    target = np.zeros((10, 10, 10), int)
    target[2:6, 2:6, 2:6] = 1
    m = case_metrics(target, target, num_classes=3)
    assert m.dice == {1: 1.0, 2: 1.0}
    assert m.hd95[1] == 0.0
    assert math.isnan(m.hd95[2])


def test_hd95_uses_spacing() -> None:
    target = np.zeros((20, 20, 20), int)
    target[5:15, 5:15, 5:15] = 1
    pred = np.roll(target, 2, axis=2)
    iso = case_metrics(pred, target, 2, spacing=(1, 1, 1)).hd95[1]
    thick = case_metrics(pred, target, 2, spacing=(1, 1, 3)).hd95[1]
    assert iso == pytest.approx(2.0)
    assert thick == pytest.approx(6.0)


def test_summarize_means_and_names() -> None:
    t = np.zeros((8, 8, 8), int)
    t[:4] = 1
    t[4:, :4] = 2
    p = t.copy()
    p[4:, :4] = 0  # class 2 missed entirely
    a = case_metrics(t, t, 3, "a")
    b = case_metrics(p, t, 3, "b")
    r = summarize([a, b], {0: "bg", 1: "one", 2: "two"})
    assert r.dice_per_class == {"one": pytest.approx(1.0), "two": pytest.approx(0.5)}
    assert r.dice_mean == pytest.approx(0.75)
    assert r.num_cases == 2
    d = r.as_dict(with_cases=True)
    assert d["per_case"][1]["case_id"] == "b"


def test_case_dice_means_and_bootstrap_interval() -> None:
    from fedmed.training.metrics import bootstrap_ci, case_dice_means

    t = np.zeros((8, 8, 8), int)
    t[:4] = 1
    t[4:, :4] = 2
    p = t.copy()
    p[4:, :4] = 0
    r = summarize([case_metrics(t, t, 3, "a"), case_metrics(p, t, 3, "b")],
                  {0: "bg", 1: "one", 2: "two"})
    assert case_dice_means(r) == [pytest.approx(1.0), pytest.approx(0.5)]

    values = [0.62, 0.71, 0.80, 0.84, 0.90]
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(np.mean(values))
    assert min(values) <= low < mean < high <= max(values)
    assert bootstrap_ci(values) == (mean, low, high)  # seeded: reproducible
    wider = bootstrap_ci(values, confidence=0.99)
    assert wider[1] <= low and wider[2] >= high
    assert bootstrap_ci([0.7, math.nan]) == (0.7, 0.7, 0.7)  # one value: nothing to resample
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
