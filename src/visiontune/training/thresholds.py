"""Multi-label decisions: one probability threshold per label, chosen on held-out predictions for the best F1.

The F1 search alone goes wrong on a rare label: predicting it for every image gives a recall of 1 and, with few
positives, an F1 that a careful threshold may not beat. So a threshold is only taken where the label is predicted for
at most twice as many images as carry it, and a label with too few held-out positives keeps 0.5.
"""

from __future__ import annotations

import numpy as np

DEFAULT = 0.5


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, labels: list[str], min_positives: int,
                      notes: list[str]) -> dict[str, float]:
    """{label: threshold} for the best held-out F1 of each label, under the guard above."""
    out, kept = {}, []
    for c, name in enumerate(labels):
        positives = int(targets[:, c].sum())
        if positives < min_positives:
            out[name] = DEFAULT
            kept.append(f"{name} ({positives})")
            continue
        out[name] = _best_f1(probs[:, c], targets[:, c].astype(bool), positives)
    if kept:
        notes.append(f"threshold left at {DEFAULT} for label(s) with fewer than {min_positives} held-out positives: "
                     f"{', '.join(kept)}")
    return out


def _best_f1(p: np.ndarray, truth: np.ndarray, positives: int) -> float:
    order = np.argsort(-p, kind="stable")
    ranked, hits = p[order], truth[order]
    tp = np.cumsum(hits)
    predicted = np.arange(1, len(p) + 1)
    f1 = 2 * tp / (predicted + positives)
    distinct = np.append(ranked[1:] < ranked[:-1], True)  # a cut only between different probabilities
    allowed = distinct & (predicted <= 2 * positives)
    if not allowed.any():
        return DEFAULT
    k = int(np.flatnonzero(allowed)[np.argmax(f1[allowed])])
    below = ranked[k + 1] if k + 1 < len(ranked) else 0.0
    return round(float((ranked[k] + below) / 2), 4)  # halfway to the next image down: the cut generalises
