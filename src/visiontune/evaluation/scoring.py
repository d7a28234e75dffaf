"""Which images an evaluation scores, and their logits.

By default a run is scored on its own split.csv; `--data` scores it on another dataset whose classes must
be the model's (or a subset of them, with `allow_subset`). Images are decoded and scored a chunk at a
time, so memory stays flat on a large test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.config import SPLITS, EvalConfig
from visiontune.data.index import Dataset, load_dataset
from visiontune.data.loader import load_all
from visiontune.data.parallel import progress
from visiontune.data.transforms import center_crop, tta_views
from visiontune.errors import DatasetError
from visiontune.models.run_dir import RunDir


@dataclass
class Selection:
    """The images of one split, as absolute paths and model label ids."""

    paths: list[str]
    labels: np.ndarray
    split: str
    source: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Scored:
    paths: list[str]
    labels: np.ndarray
    logits: np.ndarray  # raw, before any temperature
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unknown_scores: np.ndarray | None = None  # the model's open-set score per image, when it has one


def run_split(run_dir: Path) -> Dataset:
    path = RunDir(run_dir).split
    if not path.is_file():
        raise DatasetError(f"{run_dir}: {RunDir.SPLIT} is missing; pass --data to say which images to score")
    return load_dataset(path)


def select(dataset: Dataset, split: str, model_labels: list[str], *, allow_subset: bool = False,
           require_split: bool = True, multilabel: bool = False) -> Selection:
    """The images of `split` (every image when the dataset has no splits and `require_split` is false),
    mapped onto the model's label ids; a class the model does not know, or (without `allow_subset`)
    a model class the data lacks, is an error that lists them. With `multilabel` (or data holding label sets) the
    labels are one 0/1 row per image over the model's labels."""
    if split not in SPLITS:
        raise DatasetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    notes = []
    if dataset.has_splits:
        mask = dataset.splits == SPLITS.index(split)
        if not mask.any():
            present = sorted({SPLITS[s] for s in set(dataset.splits.tolist())}, key=SPLITS.index)
            raise DatasetError(f"{dataset.source}: no {split} images (its splits: {', '.join(present)}); "
                               f"choose another with --split")
    elif require_split:
        raise DatasetError(f"{dataset.source}: has no split column or split folders")
    else:
        mask = np.ones(len(dataset), dtype=bool)
        notes.append(f"{dataset.source} has no splits: all {len(dataset)} images are scored")
    data_classes = sorted(dataset.classes[i] for i in dataset.present(mask))
    known = set(model_labels)
    unknown = [c for c in data_classes if c not in known]
    missing = [c for c in model_labels if c not in set(data_classes)]
    if unknown or (missing and not allow_subset):
        parts = []
        if unknown:
            parts.append(f"unknown to the model: {', '.join(unknown)}")
        if missing:
            parts.append(f"missing from the data: {', '.join(missing)}")
        hint = "" if unknown else " (pass --allow-subset to score the classes that are there)"
        raise DatasetError(f"{dataset.source}: the classes differ from the model's ({'; '.join(parts)}){hint}")
    index = {name: i for i, name in enumerate(model_labels)}
    keep = np.flatnonzero(mask)
    if multilabel or dataset.targets is not None:
        columns = [index[name] for name in dataset.classes if name in index]
        rows = (dataset.targets[keep] if dataset.targets is not None
                else np.eye(len(dataset.classes), dtype=np.uint8)[dataset.labels[keep]])
        labels = np.zeros((len(keep), len(model_labels)), dtype=np.int64)
        labels[:, columns] = rows[:, [c for c, name in enumerate(dataset.classes) if name in index]]
    else:
        labels = np.array([index[dataset.classes[dataset.labels[i]]] for i in keep], dtype=np.int64)
    if missing:
        notes.append(f"classes without {split} images: {', '.join(missing)}")
    return Selection([str(dataset.abspath(i)) for i in keep], labels, split, str(dataset.source), notes)


def score(classifier, selection: Selection, cfg: EvalConfig, quiet: bool = True, *, tta: bool = False) -> Scored:
    """Raw logits of every readable image of `selection` (with `tta`, averaged over the views `predict --tta`
    uses); unreadable ones are listed, not fatal."""
    spec = classifier.preprocess
    def views_of(image):
        return tta_views(image, spec.input_size) if tta else center_crop(image, spec.input_size)[None]
    paths, labels, logits, scores, skipped = [], [], [], [], []
    step = max(1, cfg.batch_images)
    with progress(len(selection.paths), f"score {selection.split}", quiet) as bar:
        for start in range(0, len(selection.paths), step):
            chunk = selection.paths[start:start + step]
            decoded = load_all(chunk, spec, workers=cfg.workers, quiet=True)
            failed = dict(decoded.failed)
            crops = []
            for k, image in enumerate(decoded.images):
                if k in failed:
                    skipped.append((chunk[k], failed[k]))
                    continue
                crops.append(views_of(image))
                paths.append(chunk[k])
                labels.append(selection.labels[start + k])
            z, s = classifier.view_outputs(crops)
            logits.append(z)
            if len(z):  # a chunk of only unreadable files says nothing about the model's outputs
                scores.append(s)
            bar.update(len(chunk))
    if not paths:
        raise DatasetError(f"{selection.source}: none of the {len(selection.paths)} {selection.split} images could be read")
    unknown = None if any(s is None for s in scores) else np.concatenate(scores).astype(np.float32)
    return Scored(paths, np.array(labels, dtype=np.int64), np.concatenate(logits).astype(np.float32), skipped, unknown)
