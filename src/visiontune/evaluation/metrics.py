"""Numbers about a classifier's predictions: accuracy, per-class quality, confusion, ROC, calibration.

Everything takes true label ids and a probability matrix (rows sum to 1) over the model's full label
set, so a class with no test images or one that is never predicted is still a row of the report.
Conventions (also in the README): precision of a class that is never predicted is 0; a class with no
images in the evaluated split has no recall or F1 (null) and is left out of the macro averages.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

from visiontune.config import EvalConfig
from visiontune.evaluation.intervals import BOOTSTRAP_SAMPLES, bootstrap_macro, wilson


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str], *,
                    ece_bins: int = EvalConfig.ece_bins, most_confused: int = EvalConfig.most_confused) -> dict:
    """Every metric of the report, as plain JSON-ready values (keys documented in the README)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows are off by ~1e-7; sklearn checks
    n, c = probs.shape
    if n == 0:
        raise ValueError("no predictions to score")
    ids = np.arange(c)
    y_pred = probs.argmax(axis=1)
    out: dict = {"images": int(n), "top1": float(np.mean(y_pred == y_true))}
    for k in (3, 5):
        if c > k:
            out[f"top{k}"] = float(top_k_accuracy_score(y_true, probs, k=k, labels=ids))
    present = np.bincount(y_true, minlength=c) > 0
    out["balanced_accuracy"] = float(np.mean([np.mean(y_pred[y_true == i] == i) for i in np.flatnonzero(present)]))
    out["log_loss"] = float(log_loss(y_true, np.clip(probs, 1e-15, 1.0), labels=ids))
    out.update(per_class_metrics(y_true, y_pred, labels))
    counts = confusion_matrix(y_true, y_pred, labels=ids)
    out["confusion_matrix"] = counts.tolist()
    out["most_confused"] = most_confused_pairs(counts, labels, most_confused)
    out["roc_auc"] = roc_auc(y_true, probs, labels)
    calibration = reliability(y_true, probs, ece_bins)
    out["ece"] = calibration["ece"]
    out["reliability"] = calibration["bins"]
    out["intervals"] = headline_intervals(y_true, probs, out)
    return out


def headline_intervals(y_true: np.ndarray, probs: np.ndarray, out: dict) -> dict:
    """95 % intervals of the headline metrics (see `intervals`): Wilson for accuracies, bootstrap otherwise."""
    n, c = probs.shape
    result = {k: list(wilson(round(out[k] * n), n)) for k in ("top1", "top3", "top5") if k in out}
    boot = bootstrap_macro(y_true, probs.argmax(axis=1), c)
    result.update({k: list(v) for k, v in boot.items()})
    result["method"] = f"95 %: Wilson score (accuracies), percentile bootstrap over images ({BOOTSTRAP_SAMPLES}x)"
    return result


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    ids = np.arange(len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    predicted = np.bincount(y_pred, minlength=len(labels))
    present = support > 0
    rows = []
    for i, name in enumerate(labels):
        rows.append({"label": name, "support": int(support[i]), "predicted": int(predicted[i]),
                     "precision": float(precision[i]) if present[i] or predicted[i] else None,
                     "recall": float(recall[i]) if present[i] else None,
                     "f1": float(f1[i]) if present[i] else None})
    weights = support[present] / support[present].sum()
    averages = {}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        averages.setdefault("macro", {})[name] = float(values[present].mean())
        averages.setdefault("weighted", {})[name] = float((values[present] * weights).sum())
    return {"per_class": rows, **averages, "absent_classes": [labels[i] for i in np.flatnonzero(~present)],
            "never_predicted": [labels[i] for i in np.flatnonzero(present & (predicted == 0))]}


def most_confused_pairs(counts: np.ndarray, labels: list[str], limit: int) -> list[dict]:
    """Off-diagonal cells, largest first (ties by label order): which class is mistaken for which."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    true_ids, pred_ids = np.nonzero(off)
    order = sorted(zip(true_ids, pred_ids), key=lambda tp: (-off[tp], tp[0], tp[1]))[:limit]
    return [{"true": labels[t], "predicted": labels[p], "count": int(off[t, p]),
             "share_of_true": float(off[t, p] / counts[t].sum())} for t, p in order]


def normalized_rows(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the class's recall on the diagonal); an empty row stays zero."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def roc_auc(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """One-vs-rest AUC per class (null where a class has no positives or no negatives in the split),
    their macro mean, and the micro AUC over all (image, class) pairs."""
    onehot = np.eye(len(labels), dtype=np.int64)[y_true]
    per_class = {}
    for i, name in enumerate(labels):
        positives = onehot[:, i].sum()
        per_class[name] = float(roc_auc_score(onehot[:, i], probs[:, i])) if 0 < positives < len(y_true) else None
    defined = [v for v in per_class.values() if v is not None]
    return {"micro": float(roc_auc_score(onehot.ravel(), probs.ravel())) if len(labels) > 1 else None,
            "macro": float(np.mean(defined)) if defined else None, "per_class": per_class}


def roc_curves(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """False/true positive rates: "micro" over all pairs, and per class where defined."""
    onehot = np.eye(len(labels), dtype=np.int64)[y_true]
    curves = {"micro": roc_curve(onehot.ravel(), probs.ravel())[:2]}
    for i, name in enumerate(labels):
        if 0 < onehot[:, i].sum() < len(y_true):
            curves[name] = roc_curve(onehot[:, i], probs[:, i])[:2]
    return curves


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int) -> dict:
    """Expected calibration error over equal-width bins of top-1 confidence, and the bins themselves."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    # A confidence of exactly 1.0 belongs in the last bin; every bin is (lower, upper].
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
               "confidence": float(confidence[mask].mean()) if count else None,
               "accuracy": float(correct[mask].mean()) if count else None}
        if count:
            ece += count / len(y_true) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"ece": float(ece), "bins": rows}


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), y_true]))

    # log T in [-3, 3]: T between 0.05 and 20 covers any network that is not broken.
    found = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def choose_uncertainty_threshold(probs: np.ndarray, y_true: np.ndarray) -> float:
    """The top-probability threshold that best separates right from wrong predictions: it maximises
    (right and at or above it) + (wrong and below it). Ties go to the lowest threshold."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    order = np.argsort(confidence, kind="stable")
    conf, ok = confidence[order], correct[order]
    # Threshold at conf[i]: images i.. are "confident". Score = right among them + wrong before them.
    right_from = np.concatenate([np.cumsum(ok[::-1])[::-1], [0]])
    wrong_before = np.concatenate([[0], np.cumsum(~ok)])
    scores = right_from + wrong_before
    # A threshold can only fall between two different confidences (or below / above all of them).
    valid = np.concatenate([[True], conf[1:] > conf[:-1], [True]])
    best = int(np.argmax(np.where(valid, scores, -1)))  # the first maximum: the lowest threshold among ties
    if best == 0:
        return 0.0
    return float(conf[best]) if best < len(conf) else float(np.nextafter(1.0, 2.0))
