"""How sure a headline number is: 95 % intervals, and whether two models' difference on the same images is real.

Accuracies (top-1, top-k) get Wilson score intervals, right even for small test sets and accuracies near 100 %;
macro F1 and balanced accuracy, which are not proportions, get percentile bootstrap intervals over the images
(seeded, so a report is reproducible). Two models scored on the same images are compared with McNemar's exact
test on the images exactly one of them gets right: the paired test, far more sensitive than comparing intervals.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 1000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (0, 1 when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _macro_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray, c: int) -> tuple[float, float]:
    """(macro F1, balanced accuracy) over `classes` (those present in the whole scored set)."""
    counts = np.bincount(y_true * c + y_pred, minlength=c * c).reshape(c, c)
    tp = np.diag(counts).astype(np.float64)
    support, predicted = counts.sum(1), counts.sum(0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=(precision + recall) > 0)
    return float(f1[classes].mean()), float(recall[classes][support[classes] > 0].mean())


def bootstrap_macro(y_true: np.ndarray, y_pred: np.ndarray, c: int, samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile bootstrap intervals of macro F1 and balanced accuracy."""
    classes = np.flatnonzero(np.bincount(y_true, minlength=c) > 0)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws = np.array([_macro_scores(y_true[idx], y_pred[idx], classes, c)
                      for idx in (rng.integers(0, n, n) for _ in range(samples))])
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    return {"macro_f1": (float(lo[0]), float(hi[0])), "balanced_accuracy": (float(lo[1]), float(hi[1]))}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test: of the images exactly one model gets right, is the split more lopsided than a fair
    coin would make it? `p_value` < 0.05 marks a real difference."""
    from scipy.stats import binomtest

    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    discordant = a_only + b_only
    p = float(binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return {"only_first_right": a_only, "only_second_right": b_only, "p_value": p, "significant": p < 0.05}


def span(interval) -> str:
    """An interval as people read it: "48.0–89.1%"."""
    lo, hi = interval
    return f"{lo * 100:.1f}–{hi:.1%}"


def describe(value: float, interval, n: int) -> str:
    """"73.33% (48.0–89.1%, 15 images)": the number as a reader should take it."""
    if not interval:
        return f"{value:.2%}"
    return f"{value:.2%} ({span(interval)}, {n:,} images)"
