"""Explain image files with a run's model: decode, batch, explain, write PNGs; unreadable files are listed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.config import ExplainConfig
from visiontune.data.decode import ImageSource, describe_source
from visiontune.data.loader import load_for_model
from visiontune.errors import ImageDecodeError
from visiontune.explain.faithfulness import score_image, summarize
from visiontune.explain.gradcam import Explainer, Explanation
from visiontune.explain.render import explanation_png, grid_png
from visiontune.models.bundle import load_bundle
from visiontune.models.locate import require_run


@dataclass
class ExplainResult:
    explanations: list[Explanation]
    files: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    faithfulness: dict = field(default_factory=dict)  # means over the images (with faithfulness=True)
    per_image: list[dict] = field(default_factory=list)


def load_explainer(model: str | Path, method: str = ExplainConfig.method, layer: str | None = None) -> Explainer:
    """An Explainer for a run directory. Exported files and ensembles have no one network's gradients to offer,
    and say so."""
    network, meta = load_bundle(require_run(model, "Grad-CAM"))
    temperature = float((meta.extra.get("calibration") or {}).get("temperature", 1.0))
    return Explainer(network, meta.labels, meta.preprocess, method=method, layer=layer, temperature=temperature)


def explain_sources(explainer: Explainer, sources: list[ImageSource], *, target: str | int | None = None,
                    top_k: int = ExplainConfig.top_k, batch_size: int = ExplainConfig.batch_size,
                    out: Path | None = None, grid: bool = False, faithfulness: bool = False) -> ExplainResult:
    """Explain every readable source; with `out`, one PNG each (or one grid.png with `grid`)."""
    wanted = explainer.target_index(target)
    result = ExplainResult([])
    scores = []
    for start in range(0, len(sources), max(1, batch_size)):
        crops, where = [], []
        for k, source in enumerate(sources[start:start + batch_size], start):
            try:
                crops.append(load_for_model(source, explainer.preprocess))
                where.append(describe_source(source, k))
            except ImageDecodeError as exc:
                result.failed.append((describe_source(source, k), exc.reason))
        if not crops:
            continue
        batch = np.stack(crops)
        explained = explainer.explain(batch, [wanted] * len(batch), top_k=top_k, sources=where)
        result.explanations += explained
        if faithfulness:
            for crop, e in zip(batch, explained):
                f = score_image(explainer.model, explainer.preprocess, crop, e.heatmap, explainer.labels.index(e.target),
                                temperature=explainer.temperature)
                scores.append(f)
                result.per_image.append({"source": e.source, "target": e.target, **f.to_dict()})
    result.faithfulness = summarize(scores)
    if out is not None and result.explanations:
        out = Path(out)
        if grid:
            result.files.append(grid_png(result.explanations, out / f"grid.{explainer.method}.png"))
        else:
            for i, e in enumerate(result.explanations):
                stem = Path(e.source).stem if not e.source.startswith("<") else f"image{i}"
                result.files.append(explanation_png(e, _unique(out / f"{stem}.{explainer.method}.png", result.files)))
    return result


def _unique(path: Path, taken: list[Path]) -> Path:
    """Two inputs with one name (a/x.jpg, b/x.jpg) must not write over each other's explanation."""
    candidate, n = path, 2
    while candidate in taken:
        candidate = path.with_name(f"{path.stem.rsplit('.', 1)[0]}-{n}.{path.stem.rsplit('.', 1)[1]}.png")
        n += 1
    return candidate
