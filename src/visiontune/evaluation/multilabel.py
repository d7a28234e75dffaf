"""Numbers about a multi-label classifier: mean average precision, each label's AP / precision / recall / F1 at its
threshold, micro and macro F1, subset accuracy and Hamming loss, with 95 % intervals; and the most-missed labels.

Takes one 0/1 row per image (`targets`) and a probability per label (sigmoid outputs). Conventions follow the
single-label metrics: a label with no positive image has no AP, recall or F1 (null) and is left out of the macro
averages; precision of a label never predicted is 0.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve

from visiontune.evaluation.intervals import BOOTSTRAP_SAMPLES, wilson


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: list[str], *,
                       most_missed: int = 10, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    y = np.asarray(targets).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if not len(y):
        raise ValueError("no predictions to score")
    predicted = p >= np.asarray(thresholds)[None, :]
    out = {"task": "multilabel", "images": int(len(y)), **_summary(y, p, predicted)}
    out["per_label"] = per_label(y, p, predicted, thresholds, labels)
    out["most_missed"] = sorted(({"label": r["label"], "missed": r["missed"], "support": r["support"]}
                                 for r in out["per_label"] if r["missed"]),
                                key=lambda r: (-r["missed"], r["label"]))[:most_missed]
    out["intervals"] = _intervals(y, p, predicted, out, samples, seed)
    return out


def _summary(y: np.ndarray, p: np.ndarray, predicted: np.ndarray) -> dict:
    tp = (y & predicted).sum(axis=0).astype(np.float64)
    fp = (~y & predicted).sum(axis=0).astype(np.float64)
    fn = (y & ~predicted).sum(axis=0).astype(np.float64)
    present = y.any(axis=0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1e-12)
    ap = [average_precision(y[:, c], p[:, c]) for c in np.flatnonzero(present)]
    return {"mAP": float(np.mean(ap)) if ap else None,
            "micro_f1": float(micro),
            "macro_f1": float(f1[present].mean()) if present.any() else None,
            "subset_accuracy": float(np.mean((y == predicted).all(axis=1))),
            "hamming_loss": float(np.mean(y != predicted)),
            "images_with_no_label_predicted": int((~predicted.any(axis=1)).sum())}


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's average precision (tied scores are one step), in numpy: the bootstrap calls it thousands of
    times."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order].astype(np.float64)
    last = np.append(np.flatnonzero(np.diff(s)), len(s) - 1)  # the end of each run of tied scores
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall = tp / max(tp[-1], 1e-12)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def per_label(y: np.ndarray, p: np.ndarray, predicted: np.ndarray, thresholds: np.ndarray, labels: list[str]) -> list:
    rows = []
    for c, name in enumerate(labels):
        truth, guess = y[:, c], predicted[:, c]
        tp, support, n_pred = int((truth & guess).sum()), int(truth.sum()), int(guess.sum())
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support if support else None
        f1 = (2 * tp / (support + n_pred)) if support else None
        rows.append({"label": name, "threshold": float(thresholds[c]), "support": support, "predicted": n_pred,
                     "ap": average_precision(truth, p[:, c]) if support else None,
                     "precision": precision, "recall": recall, "f1": f1, "missed": support - tp})
    return rows


def _intervals(y: np.ndarray, p: np.ndarray, predicted: np.ndarray, out: dict, samples: int, seed: int) -> dict:
    """Wilson for subset accuracy (a proportion of images); percentile bootstrap over images for the others."""
    n = len(y)
    result = {"subset_accuracy": list(wilson(round(out["subset_accuracy"] * n), n))}
    rng = np.random.default_rng(seed)
    keys = ("mAP", "micro_f1", "macro_f1", "hamming_loss")
    draws = []
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        s = _summary(y[idx], p[idx], predicted[idx])
        draws.append([s[k] if s[k] is not None else np.nan for k in keys])
    draws = np.array(draws, dtype=np.float64)
    for k, column in zip(keys, draws.T):
        if out[k] is not None and np.isfinite(column).any():
            lo, hi = np.nanpercentile(column, [2.5, 97.5])
            result[k] = [float(lo), float(hi)]
    return result


def pr_curves(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{label: (recall, precision)} for every label with a positive image."""
    y = np.asarray(targets).astype(bool)
    out = {}
    for c, name in enumerate(labels):
        if y[:, c].any():
            precision, recall, _ = precision_recall_curve(y[:, c], probs[:, c])
            out[name] = (recall, precision)
    return out


def summary_line(m: dict) -> str:
    """The terminal's line for a multi-label evaluation."""
    ci = m.get("intervals", {})
    parts = [f"{name} {m[key]:.3f}" + (f" ({ci[key][0]:.3f}-{ci[key][1]:.3f})" if key in ci else "")
             for key, name in (("mAP", "mAP"), ("micro_f1", "micro F1"), ("macro_f1", "macro F1"),
                               ("subset_accuracy", "subset accuracy"), ("hamming_loss", "Hamming loss"))
             if m.get(key) is not None]
    missed = ", ".join(f"{r['label']} {r['missed']}/{r['support']}" for r in m.get("most_missed", [])[:3])
    return f"{m['split']}: {'  '.join(parts)}  ({m['images']} images)" + (f"\n  most missed: {missed}" if missed else "")
