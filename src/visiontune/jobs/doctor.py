"""`doctor`: the images whose labels look wrong, the outliers, and the duplicates labelled differently.

The sequence: the scan (usable files, their digests, duplicate groups), the pretrained backbone's centre-crop
features of every usable image through the view cache, out-of-fold probabilities of a logistic regression on them
(every split of the data: a wrong label anywhere matters, in test most of all), then confident learning, the
nearest-neighbour outliers and the duplicate groups (`data/label_issues.py`), written out by `doctor_output`.
Nothing is written outside the output folder (and the cache folder, when one is given).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from visiontune.config import SPLITS, DoctorConfig
from visiontune.data.index import NO_SPLIT, Dataset
from visiontune.data.integrity import ScanReport, scan_dataset
from visiontune.data.label_issues import (
    confident_learning,
    confirmed_groups,
    conflicting_groups,
    far_out,
    out_of_fold_probabilities,
    outlier_distances,
)
from visiontune.errors import ConfigError, DatasetError, ModelError
from visiontune.jobs.doctor_report import KINDS, DoctorResult, Issue, write_outputs
from visiontune.models.registry import get_spec
from visiontune.training.feature_cache import DiskCache
from visiontune.training.pretrained_features import PooledFeatures, pretrained_features


def prepare_out_dir(dataset: Dataset, out: Path, overwrite: bool) -> Path:
    """`out`, refused when it lies inside the user's data or holds something and `overwrite` is off."""
    target = Path(os.path.abspath(out))
    protected = {os.path.abspath(dataset.root)} if dataset.layout != "manifest" else {
        os.path.dirname(os.path.abspath(dataset.abspath(i))) for i in range(len(dataset))}
    if dataset.layout == "manifest" and target == Path(os.path.abspath(dataset.source)):
        raise ConfigError(f"--out {out}: that is the dataset's manifest; write the doctor's folder somewhere else")
    for folder in (target, *target.parents):
        if str(folder) in protected:
            raise ConfigError(f"--out {out}: inside the data ({folder}); the doctor never writes there, give an --out "
                              f"outside it")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out}: a file is there, not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: the folder is not empty; pass --overwrite to replace the doctor's files "
                          f"in it, or give another --out")
    return Path(out)


def diagnose(dataset: Dataset, cfg: DoctorConfig, out: Path, *, data_label: str, overwrite: bool = False,
             quiet: bool = True) -> DoctorResult:
    started = time.perf_counter()
    out = prepare_out_dir(dataset, out, overwrite)
    get_spec(cfg.model)  # a wrong name fails before the scan, a weights file the user named too
    if cfg.weights and not Path(cfg.weights).is_file():
        raise ModelError(f"--weights {cfg.weights}: no such file")
    report = scan_dataset(dataset, cfg.scan, quiet=quiet)
    if report.unusable_reason:
        raise DatasetError(report.unusable_reason)
    notes = [f"{f.path}: {f.reason}" for f in dataset.findings if f.level != "info"]
    notes += [f"skipped {path}: {reason}" for path, reason in report.skipped()]
    usable = np.flatnonzero(report.usable)
    folds = _folds(dataset, report.usable, cfg.folds)
    with tempfile.TemporaryDirectory(prefix="visiontune-doctor-") as scratch:
        disk = DiskCache(Path(cfg.cache_dir) if cfg.cache_dir else Path(scratch))
        pooled = pretrained_features([str(dataset.abspath(i)) for i in range(len(dataset))],
                                     [report.digest(i) if report.usable[i] else "" for i in range(len(dataset))],
                                     _chunks(dataset, usable), model=cfg.model, weights=cfg.weights,
                                     input_size=cfg.input_size, disk=disk, workers=cfg.scan.workers, quiet=quiet)
    notes += pooled.notes
    kept = pooled.kept
    labels = dataset.labels[kept]
    row = np.full(len(dataset), -1)
    row[kept] = np.arange(len(kept))
    duplicates = confirmed_groups(report.exact_duplicates + report.near_duplicates, pooled.features, row,
                                  cfg.duplicate_similarity)
    probs = out_of_fold_probabilities(pooled.features, labels, len(dataset.classes), folds=folds, l2=cfg.l2,
                                      seed=cfg.seed, groups=_groups(len(dataset), duplicates)[kept], quiet=quiet)
    verdicts = confident_learning(probs, labels)
    full = np.full((len(dataset), len(dataset.classes)), np.nan)
    full[kept] = probs
    issues: list[Issue] = []
    for k in verdicts.issues(cfg.rank_by):
        i = int(kept[k])
        issues.append(_issue(dataset, "mislabel", i, full, int(verdicts.suggested[k]),
                             float(verdicts.score(cfg.rank_by)[k])))
    conflicts = conflicting_groups(duplicates, dataset.labels, full)
    for g, conflict in enumerate(conflicts):
        for i in conflict.members:
            suggestion = conflict.suggested if conflict.suggested != dataset.labels[i] else -1
            issues.append(_issue(dataset, "duplicate", i, full, suggestion, -conflict.probability, group=g))
    distances = outlier_distances(pooled.features, cfg.neighbours)
    far = np.flatnonzero(far_out(distances, cfg.outlier_fence))
    for k in far[np.argsort(-distances[far], kind="stable")]:
        issues.append(_issue(dataset, "outlier", int(kept[k]), full, -1, -float(distances[k])))
    summary = _summary(dataset, data_label, cfg, report, pooled, probs, labels, verdicts.thresholds, issues, folds)
    result = DoctorResult(out, dataset, issues, summary, cfg, conflicts, notes)
    summary["suggested"] = len({i.index for i in issues if i.suggested})
    summary["relabelled"] = len(result.relabelled())
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["notes"] = notes
    write_outputs(result)
    return result


def _folds(dataset: Dataset, usable: np.ndarray, folds: int) -> int:
    """Every class needs 2 usable images: one judged, one (at least) in the model that judges it. A class smaller
    than the number of folds is fine: each fold holds out at most one of its images."""
    counts = dataset.class_counts(usable)
    small = {name: n for name, n in counts.items() if n < 2}
    if small:
        listed = ", ".join(f"{name!r} ({n})" for name, n in small.items())
        raise DatasetError(f"{dataset.source}: class(es) with fewer than 2 usable images: {listed}; an image can only "
                           f"be judged by a model that saw other images of its class")
    return min(folds, int(usable.sum()))


def _groups(n: int, duplicates: list[list[int]]) -> np.ndarray:
    """A group number per file: the copies of one picture share theirs, every other file has its own."""
    groups = np.arange(n)
    for members in duplicates:
        groups[members] = members[0]
    return groups


def _chunks(dataset: Dataset, usable: np.ndarray) -> list[np.ndarray]:
    """Usable files by given split (a train run caches its splits' centre crops the same way, so its cache serves
    here), or all together when the data has no splits."""
    if not dataset.has_splits:
        return [usable]
    split_of = dataset.splits[usable]
    return [usable[split_of == s] for s in range(len(SPLITS)) if (split_of == s).any()]


def _issue(dataset: Dataset, kind: str, i: int, probs: np.ndarray, suggested: int, score: float,
           group: int | None = None) -> Issue:
    given = int(dataset.labels[i])
    row = probs[i]
    known = not np.isnan(row).any()
    split = int(dataset.splits[i])
    return Issue(kind, i, dataset.paths[i], SPLITS[split] if split != NO_SPLIT else "", dataset.classes[given],
                 dataset.classes[suggested] if suggested >= 0 else "",
                 float(row[given]) if known else None, float(row[suggested]) if known and suggested >= 0 else None,
                 score, group)


def _summary(dataset: Dataset, data_label: str, cfg: DoctorConfig, report: ScanReport, pooled: PooledFeatures,
             probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, issues: list[Issue], folds: int) -> dict:
    return {
        "data": data_label,
        "layout": dataset.layout,
        "files": len(dataset),
        "usable": int(report.usable.sum()),
        "scored": int(len(labels)),
        "classes": list(dataset.classes),
        "model": cfg.model,
        "input_size": pooled.preprocess.input_size,
        "features": {"from_cache": int(len(labels) - pooled.computed), "computed": int(pooled.computed)},
        "folds": folds,
        "out_of_fold_agreement": float((probs.argmax(axis=1) == labels).mean()) if len(labels) else 0.0,
        "thresholds": {name: float(t) for name, t in zip(dataset.classes, thresholds)},
        "counts": {kind: sum(i.kind == kind for i in issues) for kind in KINDS},
        "settings": {"l2": cfg.l2, "rank_by": cfg.rank_by, "neighbours": cfg.neighbours,
                     "outlier_fence": cfg.outlier_fence, "duplicate_similarity": cfg.duplicate_similarity,
                     "relabel_probability": cfg.relabel_probability, "seed": cfg.seed},
    }
