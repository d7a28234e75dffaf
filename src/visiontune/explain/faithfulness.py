"""Is the heat map faithful? Deletion and insertion scores (Petsiuk et al., RISE, 2018).

Deletion: replace the most salient pixels first (by a blurred copy of the image) and watch the explained
class's probability fall; the area under that curve is small when the map found what the model uses.
Insertion: start from the blurred image and restore the most salient pixels first; the area is large when
the map is right. Both are also measured with a random pixel order, the baseline a map has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from visiontune.config import ExplainConfig
from visiontune.data.transforms import normalize


@dataclass
class Faithfulness:
    deletion: float  # area under the probability curve as salient pixels are removed (lower is better)
    insertion: float  # ... as salient pixels are restored into a blurred image (higher is better)
    random_deletion: float  # the same with a random pixel order
    random_insertion: float

    def to_dict(self) -> dict:
        return {"deletion": self.deletion, "insertion": self.insertion, "random_deletion": self.random_deletion,
                "random_insertion": self.random_insertion}


def blurred(crop: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(radius)))


def _curves(crop: np.ndarray, base: np.ndarray, order: np.ndarray, steps: int) -> np.ndarray:
    """2*(steps+1) images: deletion at 0..100 % of pixels removed, then insertion at 0..100 % restored."""
    h, w = crop.shape[:2]
    images = []
    for start, end in ((crop, base), (base, crop)):
        for k in range(steps + 1):
            mask = np.zeros(h * w, dtype=bool)
            mask[order[: int(round(k / steps * h * w))]] = True
            mask = mask.reshape(h, w, 1)
            images.append(np.where(mask, end, start))
    return np.stack(images)


def _area(probabilities: np.ndarray) -> float:
    """Trapezoid area over the fraction of pixels, 0..1."""
    y = np.asarray(probabilities, dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2).sum() / (len(y) - 1))


def score_image(model: torch.nn.Module, preprocess, crop: np.ndarray, heatmap: np.ndarray, target: int, *,
                steps: int = ExplainConfig.faithfulness_steps, blur_radius: float = ExplainConfig.blur_radius,
                temperature: float = 1.0, seed: int = 0) -> Faithfulness:
    base = blurred(crop, blur_radius)
    salient = np.argsort(-heatmap.ravel(), kind="stable")
    random = np.random.default_rng(seed).permutation(heatmap.size)
    batch = np.concatenate([_curves(crop, base, salient, steps), _curves(crop, base, random, steps)])
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize(batch, preprocess))).float()
    p = torch.softmax(logits / temperature, dim=1)[:, target].numpy()
    n = steps + 1
    return Faithfulness(_area(p[:n]), _area(p[n:2 * n]), _area(p[2 * n:3 * n]), _area(p[3 * n:]))


def summarize(scores: list[Faithfulness]) -> dict:
    """Means over images, and how much better than random the map is on each curve."""
    if not scores:
        return {}
    mean = {k: float(np.mean([getattr(s, k) for s in scores]))
            for k in ("deletion", "insertion", "random_deletion", "random_insertion")}
    mean["images"] = len(scores)
    mean["deletion_gain"] = mean["random_deletion"] - mean["deletion"]
    mean["insertion_gain"] = mean["insertion"] - mean["random_insertion"]
    return mean
