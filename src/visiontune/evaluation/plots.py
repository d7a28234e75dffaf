"""The report's pictures, as PNG files. matplotlib's object API only (no pyplot state), so plotting many
runs in one process neither leaks figures nor needs a display."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from visiontune.evaluation.metrics import normalized_rows

DPI = 110
# At most this many classes get tick labels and numbers in their cells; beyond it the matrix is a heat map
# and a zoomed view of the most-confused classes carries the names.
LABELLED_CLASSES = 30
ZOOM_CLASSES = 12


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def training_curves(history: list[dict], path: Path) -> Path | None:
    """Loss, accuracy and learning rate per epoch, train and validation, with the phase changes marked."""
    if not history:
        return None
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    x = np.arange(1, len(history) + 1)

    def series(key):
        return np.array([r[key] if isinstance(r.get(key), (int, float)) else np.nan for r in history], dtype=float)

    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(x, series(f"train_{key}"), marker="o", ms=3, label="train")
        ax.plot(x, series(f"val_{key}"), marker="o", ms=3, label="validation")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[2].plot(x, series("lr"), marker="o", ms=3, color="tab:green")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    phases = [r["phase"] for r in history]
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            for ax in axes:
                ax.axvline(i + 0.5, color="grey", ls="--", lw=1)
            axes[0].annotate(phases[i], (i + 0.6, 0.95), xycoords=("data", "axes fraction"), fontsize=8, color="grey")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def class_order(counts: np.ndarray) -> np.ndarray:
    """Classes by recall, worst first, so the trouble sits in the top-left corner of the matrix."""
    recall = np.diag(normalized_rows(counts))
    support = counts.sum(axis=1)
    return np.lexsort((np.arange(len(recall)), -support, recall))


def confusion_matrix(counts: np.ndarray, labels: list[str], path: Path) -> Path:
    """Row-normalised matrix (colour) with the counts written in when the classes are few enough to read."""
    counts = np.asarray(counts)
    order = class_order(counts)
    return _matrix(counts[np.ix_(order, order)], [labels[i] for i in order], path,
                   f"confusion matrix (rows: true class, sorted by recall; {len(labels)} classes)")


def confused_block(counts: np.ndarray, labels: list[str], path: Path, limit: int = ZOOM_CLASSES) -> Path | None:
    """The classes taking part in the most confusions, as their own small, fully labelled matrix."""
    counts = np.asarray(counts)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    if not off.any():
        return None
    chosen: list[int] = []
    for flat in np.argsort(-off, axis=None, kind="stable"):
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0 or len(chosen) >= limit:
            break
        for c in (int(t), int(p)):
            if c not in chosen and len(chosen) < limit:
                chosen.append(c)
    chosen.sort()
    return _matrix(counts[np.ix_(chosen, chosen)], [labels[i] for i in chosen], path,
                   "most-confused classes (counts; rows: true class)", annotate=True)


def _matrix(counts: np.ndarray, labels: list[str], path: Path, title: str, annotate: bool | None = None) -> Path:
    n = len(labels)
    labelled = n <= LABELLED_CLASSES or annotate
    side = min(22.0, max(4.5, 0.38 * n + 2)) if labelled else 12.0
    fig = Figure(figsize=(side, side * 0.9))
    ax = fig.subplots()
    rows = normalized_rows(counts)
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if labelled:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        if annotate is not False:
            for (t, p), value in np.ndenumerate(counts):
                if value:
                    ax.text(p, t, str(int(value)), ha="center", va="center", fontsize=7,
                            color="white" if rows[t, p] > 0.6 else "black")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def f1_bars(per_class: list[dict], path: Path) -> Path:
    """Per-class F1, worst at the top (classes without test images are left out)."""
    rows = sorted((r for r in per_class if r["f1"] is not None), key=lambda r: (r["f1"], r["label"]))
    fig = Figure(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, [r["f1"] for r in rows], color="tab:blue")
    ax.set_yticks(y, [f"{r['label']} ({r['support']})" for r in rows], fontsize=8 if len(rows) <= 40 else 6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (test images in brackets)")
    ax.set_title("per-class F1, worst first")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def class_distribution(table: dict[str, dict[str, int]], path: Path) -> Path:
    """Images per class in each split, stacked."""
    labels = list(table)
    splits = [s for s in ("train", "val", "test") if any(table[c].get(s, 0) for c in labels)]
    fig = Figure(figsize=(max(6, 0.18 * len(labels) + 2), 3.6))
    ax = fig.subplots()
    bottom = np.zeros(len(labels))
    for split in splits:
        values = np.array([table[c].get(split, 0) for c in labels], dtype=float)
        ax.bar(range(len(labels)), values, bottom=bottom, label=split)
        bottom += values
    if len(labels) <= 40:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(labels)} classes")
    ax.set_ylabel("images")
    ax.set_title("class distribution per split")
    ax.legend(fontsize=8)
    return _save(fig, path)


def reliability_diagram(bins: list[dict], ece: float, path: Path, title: str = "reliability") -> Path:
    """Accuracy against confidence per bin; the gap to the diagonal is the miscalibration."""
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    filled = [b for b in bins if b["count"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax.bar(centres, [b["accuracy"] for b in filled], width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:orange", ms=4,
            label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {ece:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], auc: dict, path: Path) -> Path:
    """One-vs-rest ROC: every class thin, the micro average bold."""
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.subplots()
    for name, (fpr, tpr) in curves.items():
        if name != "micro":
            ax.plot(fpr, tpr, lw=0.7, alpha=0.45)
    fpr, tpr = curves["micro"]
    macro = f", macro AUC {auc['macro']:.3f}" if auc.get("macro") is not None else ""
    ax.plot(fpr, tpr, lw=2.2, color="black", label=f"micro AUC {auc['micro']:.3f}{macro}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one class against the rest")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def gallery(items: list[dict], path: Path, columns: int = 6) -> Path | None:
    """Images with true label, prediction and confidence (items: image uint8 HxWx3, true, predicted, probability)."""
    if not items:
        return None
    rows = (len(items) + columns - 1) // columns
    fig = Figure(figsize=(2.2 * columns, 2.5 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, item in zip(axes, items):
        ax.imshow(item["image"])
        ax.set_title(f"true: {item['true']}\npred: {item['predicted']} ({item['probability']:.0%})", fontsize=7,
                     color="tab:red" if item["true"] != item["predicted"] else "black")
    return _save(fig, path)
