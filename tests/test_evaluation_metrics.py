"""Metric values on small cases computed by hand (including a class never predicted and a class with no images)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visiontune.evaluation.metrics import choose_uncertainty_threshold, compute_metrics, fit_temperature, normalized_rows
from visiontune.inference.classifier import softmax

LABELS = ["a", "b", "c", "d"]
# Six test images: a a a b b c (d has none). Predicted: a a b b b b, so c is never predicted.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 1])


def confident(pred: np.ndarray, classes: int = 4, top: float = 0.7) -> np.ndarray:
    probs = np.full((len(pred), classes), (1 - top) / (classes - 1))
    probs[np.arange(len(pred)), pred] = top
    return probs


@pytest.fixture(scope="module")
def metrics():
    return compute_metrics(Y_TRUE, confident(Y_PRED), LABELS)


def test_accuracy_and_balanced_accuracy(metrics):
    assert metrics["images"] == 6
    assert metrics["top1"] == pytest.approx(4 / 6)
    # Recall of a, b, c (d has no images, so it is not part of the mean): 2/3, 1, 0.
    assert metrics["balanced_accuracy"] == pytest.approx(5 / 9)
    assert "top5" not in metrics and "top3" in metrics  # 4 classes: top-3 is meaningful, top-5 is not


def test_per_class_with_a_never_predicted_and_an_absent_class(metrics):
    rows = {r["label"]: r for r in metrics["per_class"]}
    assert rows["a"] == {"label": "a", "support": 3, "predicted": 2, "precision": 1.0,
                         "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8)}
    assert rows["b"]["precision"] == 0.5 and rows["b"]["recall"] == 1.0 and rows["b"]["f1"] == pytest.approx(2 / 3)
    assert rows["c"] == {"label": "c", "support": 1, "predicted": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rows["d"] == {"label": "d", "support": 0, "predicted": 0, "precision": None, "recall": None, "f1": None}
    assert metrics["never_predicted"] == ["c"] and metrics["absent_classes"] == ["d"]
    assert metrics["macro"]["precision"] == pytest.approx(0.5)
    assert metrics["macro"]["recall"] == pytest.approx(5 / 9)
    assert metrics["macro"]["f1"] == pytest.approx((0.8 + 2 / 3) / 3)
    assert metrics["weighted"]["f1"] == pytest.approx((3 * 0.8 + 2 * 2 / 3) / 6)


def test_confusion_and_most_confused_pairs(metrics):
    assert metrics["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert metrics["most_confused"] == [
        {"true": "a", "predicted": "b", "count": 1, "share_of_true": pytest.approx(1 / 3)},
        {"true": "c", "predicted": "b", "count": 1, "share_of_true": 1.0},
    ]
    rows = normalized_rows(np.array(metrics["confusion_matrix"]))
    assert rows[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0]) and rows[3].tolist() == [0, 0, 0, 0]


def test_log_loss_and_calibration_error(metrics):
    assert metrics["log_loss"] == pytest.approx(-(4 * math.log(0.7) + 2 * math.log(0.1)) / 6)
    # Every confidence is 0.7 and 4 of 6 are right: one bin, |0.667 - 0.7|.
    assert metrics["ece"] == pytest.approx(abs(4 / 6 - 0.7))
    filled = [b for b in metrics["reliability"] if b["count"]]
    assert len(filled) == 1 and filled[0]["count"] == 6 and filled[0]["lower"] < 0.7 <= filled[0]["upper"]


def test_top_k_accuracy():
    probs = np.array([[0.5, 0.2, 0.1, 0.08, 0.07, 0.05],   # true 1: rank 2
                      [0.5, 0.2, 0.1, 0.08, 0.07, 0.05],   # true 3: rank 4
                      [0.5, 0.2, 0.1, 0.08, 0.07, 0.05]])  # true 5: rank 6
    m = compute_metrics(np.array([1, 3, 5]), probs, list("abcdef"))
    assert (m["top1"], m["top3"], m["top5"]) == (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_roc_auc_by_hand():
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = compute_metrics(np.array([0, 0, 1, 1]), np.stack([1 - p1, p1], axis=1), ["x", "y"])
    assert m["roc_auc"]["per_class"] == {"x": pytest.approx(0.75), "y": pytest.approx(0.75)}
    assert m["roc_auc"]["macro"] == pytest.approx(0.75)
    assert m["roc_auc"]["micro"] == pytest.approx(13 / 16)


def test_roc_auc_is_null_for_a_class_without_images(metrics):
    assert metrics["roc_auc"]["per_class"]["d"] is None
    assert metrics["roc_auc"]["per_class"]["c"] is not None


def test_temperature_recovers_the_one_used_to_make_the_data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 5)) * 2
    labels = np.array([rng.choice(5, p=p) for p in softmax(z)])
    assert fit_temperature(z * 3.0, labels) == pytest.approx(3.0, rel=0.05)


def test_uncertainty_threshold_separates_right_from_wrong():
    conf = np.array([0.9, 0.8, 0.6, 0.55, 0.4])
    right = np.array([True, True, False, True, False])
    probs = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], axis=1)
    y = np.where(right, 0, 1)
    # Thresholds 0.55 and 0.8 both classify 4 of 5 right; the lower one wins.
    assert choose_uncertainty_threshold(probs, y) == pytest.approx(0.55)
    assert choose_uncertainty_threshold(probs[:2], y[:2]) == 0.0  # nothing wrong: nothing is uncertain


def test_wilson_interval_matches_the_textbook():
    from visiontune.evaluation.intervals import describe, wilson

    lo, hi = wilson(11, 15)  # 73.3 %: the demo's 15 test images
    assert round(lo, 3) == 0.480 and round(hi, 3) == 0.891
    assert describe(11 / 15, (lo, hi), 15) == "73.33% (48.0–89.1%, 15 images)"
    assert wilson(0, 10)[0] == 0.0 and round(wilson(10, 10)[1], 9) == 1.0 and round(wilson(10, 10)[0], 3) == 0.722


def test_headline_intervals_cover_the_metric_and_shrink_with_more_images():
    from visiontune.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        y = rng.integers(0, 4, n)
        pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 4)
        probs = np.eye(4)[pred] * 0.7 + 0.075
        m = compute_metrics(y, probs, ["a", "b", "c", "d"])
        for key, value in (("top1", m["top1"]), ("macro_f1", m["macro"]["f1"]),
                           ("balanced_accuracy", m["balanced_accuracy"])):
            lo, hi = m["intervals"][key]
            assert lo <= value <= hi, key
        widths.append(m["intervals"]["top1"][1] - m["intervals"]["top1"][0])
    assert widths[1] < widths[0] / 2


def test_mcnemar_tells_a_real_difference_from_noise():
    from visiontune.evaluation.intervals import mcnemar

    a = np.array([True] * 90 + [False] * 10)
    close = a.copy()
    close[[0, 95]] = [False, True]  # one image each way: noise
    far = a.copy()
    far[:25] = False  # 25 images only the first gets right
    assert not mcnemar(a, close)["significant"] and mcnemar(a, close)["p_value"] == 1.0
    result = mcnemar(a, far)
    assert result["significant"] and result["only_first_right"] == 25 and result["only_second_right"] == 0
