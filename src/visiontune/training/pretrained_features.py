"""Pooled centre-crop features of a pretrained backbone, for any images, through the view cache.

The cache key is the one the cached recipe gives its one-view caches (the centre crop of the files, in order), so
a `train --cache-dir` folder serves these features (view 0 of a training cache is the centre crop too).
Pooled features do not depend on where training splits the backbone (the boundary activations do), so an entry
made for any split point serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from visiontune.config import DEFAULT_VIEWS, MOST_VIEWS, TrainConfig
from visiontune.data.loader import load_all
from visiontune.data.parallel import progress
from visiontune.data.transforms import Preprocess
from visiontune.models.classifier import build_classifier
from visiontune.models.stages import stages
from visiontune.training.feature_cache import (
    DiskCache,
    FrozenFeatures,
    FrozenRunner,
    ViewCache,
    build_view_cache,
    view_cache_key,
    weights_identity,
)
from visiontune.training.phases import augment_from

# Images decoded at a time when features are computed, so memory stays flat however many there are.
_BLOCK = 256


@dataclass
class PooledFeatures:
    features: np.ndarray  # kept x D float32, in the order the chunks list the images
    kept: np.ndarray  # positions (into the paths given) of the images that have features, same order
    computed: int  # images pushed through the backbone now; the others came from the cache
    preprocess: Preprocess
    timm_name: str
    notes: list[str] = field(default_factory=list)


def pretrained_features(paths: list[str], digests: list[str], chunks: list[np.ndarray], *, model: str,
                        weights: str | None, input_size: int, disk: DiskCache, workers: int = 0,
                        quiet: bool = True) -> PooledFeatures:
    """Features of paths[chunk] for every chunk; each chunk is cached (and found) as one entry.

    `digests`: each file's content digest (`ScanReport.digest`), so a cached chunk needs no decoding at all.
    A file that fails to decode now (changed since it was scanned) has no features and is noted.
    """
    # the head is never used: only the pooled features before it
    net, spec = build_classifier(model, 2, dropout=0.0, weights=Path(weights) if weights else None,
                                 input_size=input_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()
    identity = weights_identity(spec.timm_name, weights)
    split_points = range(len(stages(net) or []) + 1)
    out = PooledFeatures(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), 0, spec.preprocess, spec.timm_name)
    runner: FrozenRunner | None = None
    parts, kept = [], []
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.int64)
        names = [digests[i] for i in chunk]
        found = next((hit for key in _keys(names, identity, spec.preprocess, split_points)
                      if (hit := disk.load(key)) is not None), None)
        if found is not None:
            parts.append(np.asarray(found.pooled[0], dtype=np.float32))
            kept.append(chunk)
            continue
        if runner is None:  # tracing the graph costs seconds: only when something is missing
            runner = FrozenRunner(FrozenFeatures(net, None, None), spec.preprocess, device, out.notes)
        pooled, ok, made = _compute([paths[i] for i in chunk], runner, spec.preprocess, workers, quiet, out.notes)
        disk.save(view_cache_key(made, identity, spec.preprocess, 0, 1, None, 0), ViewCache(None, pooled[None]))
        parts.append(pooled)
        kept.append(chunk[ok])
        out.computed += len(ok)
    if parts:
        out.features, out.kept = np.concatenate(parts), np.concatenate(kept)
    return out


def _keys(names: list[str], identity: str, spec: Preprocess, split_points: range) -> Iterator[str]:
    """Every key the centre crops of these files may be cached under: one view (these features, or a train run's
    validation, test, or training views with --views 0), then the views of a train run with the default settings
    (view 0 is the centre crop; as many views as TrainConfig.views_for gave the data)."""
    default = TrainConfig()
    looks = [(1, None, 0)] + [(1 + v, augment_from(default), default.seed) for v in range(DEFAULT_VIEWS, MOST_VIEWS + 1)]
    for views, aug, seed in looks:
        for split_at in split_points:
            yield view_cache_key(names, identity, spec, split_at, views, aug, seed)


def _compute(paths: list[str], runner: FrozenRunner, spec: Preprocess, workers: int, quiet: bool,
             notes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pooled features, positions that decoded, their digests as read now) of the centre crops of `paths`."""
    pooled, ok, digests = [], [], []
    with progress(len(paths), "features", quiet) as bar:
        for start in range(0, len(paths), _BLOCK):
            decoded = load_all(paths[start:start + _BLOCK], spec, workers=workers, quiet=True)
            for k, reason in decoded.failed:
                notes.append(f"no features for {paths[start + k]}: {reason}")
            good = [k for k, image in enumerate(decoded.images) if image is not None]
            if good:
                images = [decoded.images[k] for k in good]
                views = build_view_cache(images, np.arange(len(images)), 1, runner, spec, None, 0, desc="",
                                         quiet=True)
                pooled.append(views.pooled[0])
                ok += [start + k for k in good]
                digests += [decoded.digests[k] for k in good]
            bar.update(len(decoded.images))
    features = np.concatenate(pooled) if pooled else np.zeros((0, 0), np.float32)
    return features, np.asarray(ok, dtype=np.int64), digests
