"""Explanations as pictures: one PNG per image (original, overlay, top-k bars) or one gallery grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from visiontune.explain.gradcam import Explanation, overlay

DPI = 110


def explanation_png(e: Explanation, path: Path) -> Path:
    """Input, the class map, the attention head's map when the model has one, and the top predictions."""
    pictures = [(e.image, "input (as the model sees it)"), (e.overlay, f"{e.method} for '{e.target}' ({e.layer})")]
    if e.attention is not None:
        pictures.append((overlay(e.image, e.attention), "attention head: where it pools"))
    fig = Figure(figsize=(3.2 * (len(pictures) + 1), 3.3))
    *axes, right = fig.subplots(1, len(pictures) + 1,
                                gridspec_kw={"width_ratios": [1] * len(pictures) + [1.1], "wspace": 0.55})
    for ax, (picture, title) in zip(axes, pictures):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    names = [label for label, _ in e.predictions][::-1]
    values = [p for _, p in e.predictions][::-1]
    right.barh(range(len(names)), values, color=["tab:orange" if n == e.target else "tab:blue" for n in names])
    right.set_yticks(range(len(names)), names, fontsize=9)
    right.set_xlim(0, 1)
    for y, v in enumerate(values):
        right.text(min(v + 0.02, 0.85), y, f"{v:.1%}", va="center", fontsize=8)
    right.set_title("top predictions", fontsize=9)
    fig.suptitle(Path(e.source).name if e.source else "", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def grid_png(explanations: list[Explanation], path: Path, columns: int = 4, captions: list[str] | None = None) -> Path:
    rows = (len(explanations) + columns - 1) // columns
    fig = Figure(figsize=(2.6 * columns, 2.9 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, (ax, e) in enumerate(zip(axes, explanations)):
        ax.imshow(e.overlay)
        label, p = e.predictions[0] if e.predictions else (e.target, float("nan"))
        caption = captions[i] if captions else Path(e.source).name
        ax.set_title(f"{caption}\n{label} {p:.0%}", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
