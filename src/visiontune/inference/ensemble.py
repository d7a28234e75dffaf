"""An ensemble directory as one engine: soft voting over its members, on uint8 crops.

The directory holds `ensemble.json` (members, weights), `model.json` (labels, and the preprocessing of the member
with the largest input) and, when the members share one, `split.csv`. So evaluation, predict, serve, bench and
compare read it exactly like a run: they decode and crop images with that preprocessing and call the vote. The
vote hands each member the crop as that member expects it (the centre region matching the member's own crop
fraction, resized to its input size with its interpolation, normalised with its own mean and std), applies
the member's own calibration temperature, and returns log of the weighted mean of the members' probabilities.
"""

from __future__ import annotations

import numpy as np

from visiontune.data.transforms import Preprocess, resize_to
from visiontune.errors import ModelError
from visiontune.inference.backends import LoadedModel
from visiontune.inference.voting import ensemble_logits, normalise, softmax


def fit_crops(crops: np.ndarray, source: Preprocess, target: Preprocess) -> np.ndarray:
    """uint8 N x S x S x 3 centre crops made with `source` -> the crops `target` would have made.

    A centre crop covers `crop_pct` of the image's shorter side; the target's region is the centre
    target.crop_pct / source.crop_pct of the given crop (all of it when the target wants more than there is),
    resized to target.input_size as the target's preprocessing resizes."""
    crops = np.asarray(crops)
    size, out_size = crops.shape[1], target.input_size
    keep = min(1.0, target.crop_pct / source.crop_pct)
    side = max(1, int(round(size * keep)))
    if side == size == out_size:
        return crops
    top = (size - side) // 2
    out = np.empty((len(crops), out_size, out_size, 3), dtype=np.uint8)
    for k, crop in enumerate(crops):
        region = np.ascontiguousarray(crop[top:top + side, top:top + side])
        out[k] = region if side == out_size else np.asarray(resize_to(region, (out_size, out_size), target))
    return out


class EnsembleVote:
    """Members' calibrated probabilities, weighted and averaged; called on crops made with `preprocess`."""

    def __init__(self, members: list[LoadedModel], weights, labels: list[str], preprocess: Preprocess, where: str,
                 batch_size: int):
        self.members = members
        self.weights = normalise(weights, len(members))
        self.labels = list(labels)
        self.preprocess = preprocess
        self.where = where
        self.batch_size = max(1, batch_size)
        self.columns = []
        for member in members:
            if set(member.meta.labels) != set(labels):
                raise ModelError(f"{where}: member {member.path} now has other labels than the ensemble "
                                 f"({describe_label_difference(labels, member.meta.labels, 'the ensemble', str(member.path))}); "
                                 f"rebuild the ensemble")
            self.columns.append(np.array([member.meta.labels.index(name) for name in labels]))
        threads = [getattr(m.engine, "threads", None) for m in members]
        self.threads = threads[0] if threads and threads[0] is not None else None

    def member_probabilities(self, crops: np.ndarray, spec: Preprocess | None = None) -> np.ndarray:
        """uint8 crops made with `spec` (default: the ensemble's) -> M x N x C calibrated probabilities, in the
        ensemble's label order."""
        spec = spec or self.preprocess
        out = []
        for member, cols in zip(self.members, self.columns):
            fitted = fit_crops(crops, spec, member.meta.preprocess)
            z = np.concatenate([member.crop_logits(fitted[i:i + self.batch_size])
                                for i in range(0, len(fitted), self.batch_size)])
            out.append(softmax(z, member.temperature)[:, cols].astype(np.float64))
        return np.stack(out)

    def logits(self, crops: np.ndarray, spec: Preprocess | None = None) -> np.ndarray:
        """log of the soft vote: float32 N x C "logits" whose softmax is the ensemble's probability."""
        return ensemble_logits(self.member_probabilities(crops, spec), self.weights)


def describe_label_difference(a: list[str], b: list[str], name_a: str, name_b: str) -> str:
    only_a = [x for x in a if x not in set(b)]
    only_b = [x for x in b if x not in set(a)]
    parts = []
    if only_a:
        parts.append(f"only in {name_a}: {_some(only_a)}")
    if only_b:
        parts.append(f"only in {name_b}: {_some(only_b)}")
    return "; ".join(parts) or "same labels"


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")
