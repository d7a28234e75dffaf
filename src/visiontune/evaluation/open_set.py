"""The unknown score, fitted when a run is evaluated on its own split.

Pooled features (the run's network, centre crops) of a seeded sample of the train split, at most
`open_set_images` a class, are the reference set (`models/open_set.fit_knn`). The threshold is then chosen on the
validation split: the score below which `open_set_accept` of the validation images fall, or, given a folder of known
negatives, the score that best separates validation images from them (Youden's J). The fit goes into the run's
open_set.safetensors and the threshold into model.json's "open_set", where every engine and export picks them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.config import EvalConfig, TrainConfig
from visiontune.data.index import Dataset, walk_files
from visiontune.errors import DatasetError
from visiontune.evaluation.features import ONNX_MIN_IMAGES, RunNetwork, iter_features
from visiontune.evaluation.scoring import select
from visiontune.models import open_set
from visiontune.models.bundle import ModelMeta, update_meta
from visiontune.models.run_dir import RunDir


@dataclass
class Fitted:
    entry: dict  # model.json's "open_set"
    notes: list[str]


def negative_files(folder: str | Path | None) -> list[str]:
    """The image files of a --negatives folder, or a DatasetError naming it (checked before anything is written)."""
    if folder is None:
        return []
    path = Path(folder)
    if not path.is_dir():
        raise DatasetError(f"--negatives {folder}: {'not a folder' if path.exists() else 'no such folder'}")
    files = [str(path / rel) for rel in walk_files(path, [])]
    if not files:
        raise DatasetError(f"--negatives {folder}: empty folder (hidden files aside)")
    return files


def fit_for_run(run_dir: Path, run_data: Dataset, meta: ModelMeta, cfg: EvalConfig, negatives: list[str],
                quiet: bool = True, network: RunNetwork | None = None) -> Fitted:
    """Fit, choose the threshold, store both; an empty entry (and the reason in `notes`) when the run cannot
    have one. `network`: the run's, when the evaluation already loaded it."""
    notes: list[str] = []
    try:
        train = select(run_data, "train", meta.labels, allow_subset=True)
        val = select(run_data, "val", meta.labels, allow_subset=True)
    except DatasetError:
        return _none("no unknown score: the run has no train or no validation images to fit and threshold it on")
    rng = np.random.default_rng(_seed(run_dir))
    picked = _per_class(train.labels, cfg.open_set_images, rng)
    features = _Features(network or RunNetwork(run_dir), cfg, quiet, len(negatives) + len(picked) + len(val.paths))
    neg_x = None
    if negatives:  # first: unreadable negatives are refused before the longer passes
        neg_x = features.of(negatives, "unknown score: negatives")
        if len(neg_x) == 0:
            raise DatasetError(f"--negatives {cfg.negatives}: none of its {len(negatives)} files could be read as an "
                               f"image")
    train_x = features.of([train.paths[i] for i in picked], "unknown score: train")
    val_x = features.of(val.paths, "unknown score: val")
    if len(val_x) == 0 or len(train_x) < 2:
        return _none("no unknown score: too few readable train or validation images")
    fit = open_set.fit_knn(train_x, cfg.open_set_dims or open_set.auto_dims(len(meta.labels)))
    val_scores = fit.score(val_x)
    entry = {"method": open_set.METHOD, "fingerprint": fit.fingerprint, "dims": fit.dims, "fitted_on": "train",
             "train_images": int(len(train_x)), "val_images": int(len(val_x))}
    if neg_x is not None:
        neg_scores = fit.score(neg_x)
        threshold = open_set.separating_threshold(val_scores, neg_scores)
        entry.update(chosen_on="val and negatives", rule="largest Youden's J (val accepted - negatives accepted)",
                     negatives=str(cfg.negatives), negative_images=int(len(neg_x)),
                     negatives_rejected=round(float(np.mean(neg_scores > threshold)), 6))
    else:
        threshold = open_set.accept_threshold(val_scores, cfg.open_set_accept)
        entry.update(chosen_on="val", rule=f"accepts {cfg.open_set_accept:.0%} of validation images")
    entry.update(threshold=round(threshold, 6), val_accepted=round(float(np.mean(val_scores <= threshold)), 6))
    if len(val_x) < 20:
        notes.append(f"the unknown threshold was chosen on only {len(val_x)} validation images: it is rough")
    open_set.save_fit(run_dir, fit)
    update_meta(run_dir, **{open_set.META_KEY: entry})
    return Fitted(entry, notes + features.notes)


def forget(run_dir: Path) -> list[str]:
    """Remove the run's unknown score (model.json's entry and its fit): `evaluate --no-open-set` on a run evaluated
    before, so that no engine keeps applying a score the user turned off. Exports made earlier keep their own."""
    from visiontune.models.bundle import read_meta, write_meta

    meta = read_meta(run_dir)
    had = meta.extra.pop(open_set.META_KEY, None) is not None
    if had:
        write_meta(run_dir, meta)
    fit = RunDir(run_dir).open_set
    had |= fit.is_file()
    fit.unlink(missing_ok=True)
    return ["the unknown score fitted by an earlier evaluation was removed (--no-open-set)"] if had else []


def _none(note: str) -> Fitted:
    return Fitted({}, [note])


def report(fitted: Fitted | None, classifier, scores: np.ndarray | None) -> tuple[dict, list[str]]:
    """(metrics.json's "open_set": the fit and threshold, and the share of the scored images called unknown; notes).
    `classifier` scored the images: its engine's score and threshold are the ones a user of it gets."""
    notes = list(fitted.notes) if fitted else []
    engine_entry = open_set.entry(classifier.meta) or {}
    out = dict(fitted.entry if fitted and fitted.entry else engine_entry)
    if fitted and fitted.entry and engine_entry.get("fingerprint") != fitted.entry["fingerprint"]:
        notes.append(f"{classifier.engine_name} runs an export made before this unknown score was fitted, so the "
                     f"unknown share below is its own; export the run again to carry the new score")
    threshold = classifier.unknown_threshold
    if scores is not None and threshold is not None and len(scores):
        out.update(unknown_share=float(np.mean(scores > threshold)), threshold_applied=threshold)
    return out, notes


def summary(evaluation: dict) -> str | None:
    """One line for people on the unknown score of an evaluation (metrics.json's "evaluation"), or None."""
    unknown = evaluation.get("open_set") or {}
    if "unknown_share" not in unknown:
        return None
    chosen = (f"; threshold {unknown['threshold']:.4g} chosen on {unknown['chosen_on']}, {unknown['rule']}"
              if "rule" in unknown else "")
    rejected = (f", {unknown['negatives_rejected']:.1%} of {unknown['negative_images']} negatives rejected"
                if "negatives_rejected" in unknown else "")
    return f"unknown: {unknown['unknown_share']:.1%} of {evaluation['split']} images{chosen}{rejected}"


def _seed(run_dir: Path) -> int:
    try:
        return RunDir(run_dir).read_config()[2].seed
    except Exception:  # an older or hand-made run without a readable config: the default seed
        return TrainConfig.seed


def _per_class(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most `limit` images of each class, a seeded sample, in order."""
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.choice(idx, limit, replace=False)) if len(idx) > limit else idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class _Features:
    """Pooled features of image files through the run's network (centre crop, as evaluation scores), all lists
    through one runner: ONNX Runtime when the fit sees enough images to repay tracing (see `evaluation.features`)."""

    def __init__(self, network: RunNetwork, cfg: EvalConfig, quiet: bool, images: int):
        self.notes: list[str] = []
        self.runner = network.runner(images >= ONNX_MIN_IMAGES, self.notes)
        self.spec, self.cfg, self.quiet = network.meta.preprocess, cfg, quiet

    def of(self, paths: list[str], what: str) -> np.ndarray:
        """N x D features of the readable ones among `paths` (unreadable files are left out)."""
        chunks = [chunk.features for chunk in iter_features(None, self.spec, paths, chunk_images=self.cfg.batch_images,
                                                             workers=self.cfg.workers, quiet=self.quiet, desc=what,
                                                             runner=self.runner) if len(chunk.indices)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
