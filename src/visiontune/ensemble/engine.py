"""An ensemble directory as an inference engine: `Classifier.load(ENS)` works wherever a run does.

The directory holds `ensemble.json` (members, weights), `model.json` (labels, and the preprocessing of the
member with the largest input) and, when the members share one, `split.csv`. So evaluation, predict, serve,
bench and compare read it exactly like a run: they decode and crop images with that preprocessing and call
the engine. The engine hands each member the crop as that member expects it: the centre region matching the
member's own crop fraction, resized to its input size with its interpolation, then normalised with its own
mean and std (by the member's Classifier), with the member's own calibration temperature applied. It returns
log of the weighted mean of the members' probabilities.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.config import InferenceConfig
from visiontune.data.transforms import Preprocess, resample
from visiontune.ensemble.voting import ensemble_logits, normalise
from visiontune.errors import ConfigError, ModelError
from visiontune.models.bundle import check_format, read_meta

ENSEMBLE_FILE = "ensemble.json"
FORMAT = "visiontune-ensemble"
FORMAT_VERSION = 1


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def stored_path(member: Path, folder: Path) -> str:
    """A member's path as ensemble.json keeps it: relative to the ensemble's folder when one exists (so the
    two can move together), absolute otherwise."""
    member, folder = Path(member).resolve(), Path(folder).resolve()
    try:
        return Path(os.path.relpath(member, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return member.as_posix()


@dataclass
class MemberEntry:
    path: Path  # resolved against the ensemble folder
    stored: str  # as written in ensemble.json
    weight: float


def read_manifest(folder: Path) -> tuple[dict, list[MemberEntry]]:
    path = Path(folder) / ENSEMBLE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    check_format(data, str(path), FORMAT, FORMAT_VERSION, "ensemble")
    try:
        members = [MemberEntry(_resolve(folder, m["path"]), str(m["path"]), float(m["weight"])) for m in data["members"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed member list (missing or bad {exc})") from None
    if not members:
        raise ModelError(f"{path}: an ensemble with no members")
    return data, members


def _resolve(folder: Path, stored: str) -> Path:
    p = Path(stored)
    return p if p.is_absolute() else Path(folder) / p


def fit_crops(crops: np.ndarray, source: Preprocess, target: Preprocess) -> np.ndarray:
    """uint8 N x S x S x 3 centre crops made with `source` -> the crops `target` would have made.

    A centre crop covers `crop_pct` of the image's shorter side; the target's region is the centre
    target.crop_pct / source.crop_pct of the given crop (all of it when the target wants more than there is),
    resized to target.input_size with the target's interpolation (Pillow, antialiased like training's)."""
    crops = np.asarray(crops)
    size, out_size = crops.shape[1], target.input_size
    keep = min(1.0, target.crop_pct / source.crop_pct)
    side = max(1, int(round(size * keep)))
    if side == size == out_size:
        return crops
    top = (size - side) // 2
    out = np.empty((len(crops), out_size, out_size, 3), dtype=np.uint8)
    method = resample(target.interpolation)
    for k, crop in enumerate(crops):
        region = np.ascontiguousarray(crop[top:top + side, top:top + side])
        out[k] = region if side == out_size else np.asarray(Image.fromarray(region).resize((out_size, out_size), method))
    return out


def denormalize(batch: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Invert transforms.normalize: N x 3 x S x S float32 -> the uint8 N x S x S x 3 crops (exact: the pixels
    were integers, so rounding recovers them)."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 1, 1, 3) * 255.0
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 1, 1, 3) * 255.0
    pixels = np.asarray(batch, dtype=np.float32).transpose(0, 2, 3, 1) * std + mean
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class EnsembleEngine:
    """Members' calibrated probabilities, weighted and averaged; called like any engine on a normalised batch."""

    name = "ensemble"

    def __init__(self, members: list, weights, labels: list[str], preprocess: Preprocess, where: str):
        self.members = members  # Classifier per member
        self.weights = normalise(weights, len(members))
        self.labels = list(labels)
        self.preprocess = preprocess
        self.where = where
        self.columns = []
        for clf in members:
            if set(clf.labels) != set(labels):
                raise ModelError(f"{where}: member {clf.path} now has other labels than the ensemble "
                                 f"({describe_label_difference(labels, clf.labels, 'the ensemble', str(clf.path))}); "
                                 f"rebuild the ensemble")
            self.columns.append(np.array([clf.labels.index(name) for name in labels]))
        threads = [getattr(clf.engine, "threads", None) for clf in members]
        self.threads = threads[0] if threads and threads[0] is not None else None

    def member_probabilities(self, crops: np.ndarray, spec: Preprocess | None = None) -> np.ndarray:
        """uint8 crops made with `spec` (default: the ensemble's) -> M x N x C calibrated probabilities, in
        the ensemble's label order."""
        spec = spec or self.preprocess
        out = [clf.probabilities(fit_crops(crops, spec, clf.preprocess))[:, cols].astype(np.float64)
               for clf, cols in zip(self.members, self.columns)]
        return np.stack(out)

    def log_probabilities(self, crops: np.ndarray, spec: Preprocess | None = None) -> np.ndarray:
        return ensemble_logits(self.member_probabilities(crops, spec), self.weights)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        size = self.preprocess.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise ConfigError(f"{self.where}: expected N x 3 x {size} x {size} input, got {tuple(batch.shape)}")
        return self.log_probabilities(denormalize(batch, self.preprocess))


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


def load_members(members: list[MemberEntry], backend: str | None, threads: int, batch_size: int, where: str) -> list:
    from visiontune.inference.classifier import Classifier

    loaded = []
    for m in members:
        if not m.path.is_dir():
            raise ModelError(f"{where}: member {m.stored} is not there (looked in {m.path}); ensemble.json keeps "
                             f"member paths relative to the ensemble, so move them together")
        loaded.append(Classifier.load(m.path, backend, threads=threads, batch_size=batch_size))
    return loaded


def load_ensemble(folder: Path, backend: str | None = None, *, threads: int = InferenceConfig.threads,
                  batch_size: int = InferenceConfig.batch_size):
    """The Classifier of an ensemble directory; every member runs on `backend` (default: torch, as for a run)."""
    from visiontune.inference.classifier import Classifier, _read_metrics

    folder = Path(folder)
    _, members = read_manifest(folder)
    meta = read_meta(folder)
    where = str(folder / ENSEMBLE_FILE)
    engine = EnsembleEngine(load_members(members, backend, threads, batch_size, where), [m.weight for m in members],
                            meta.labels, meta.preprocess, where)
    return Classifier(engine, meta, path=folder, backend=engine.members[0].backend, metrics=_read_metrics(folder),
                      batch_size=batch_size)
