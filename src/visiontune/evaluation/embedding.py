"""The embedding map of report.html: scored images placed in 2-D by their pooled features, so that images the
model sees alike sit together; clusters, outliers and where the mistakes fall show at a glance.

PCA to 50 dimensions, then t-SNE (scikit-learn). A stratified, seeded sample of at most `map_points` images keeps
the extra pass of the network and the t-SNE to seconds on a large test set, and the page small.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import numpy as np

from visiontune.evaluation.features import RunNetwork
from visiontune.evaluation.report import thumbnail_jpeg
from visiontune.models.run_dir import RunDir

SEED = 0  # fixed, like the bootstrap intervals: the same run gives the same map
PCA_DIMS = 50
# t-SNE's neighbourhoods need a few points each: below this many the layout is noise, and PCA's 2-D is honest.
TSNE_MIN_POINTS = 10
# 64 px at quality 70: ~1.4 kB (~1.9 kB in base64) a flower photo, so 1,000 points add ~2 MB to the page
# (quality 60 would save only 0.2 kB more).
THUMBNAIL = 64
THUMBNAIL_QUALITY = 70


def stratified_sample(labels: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """Sorted indices of at most `n` items, each class in proportion to its size and, when `n` allows, every
    class at least once: each class's members are shuffled and ranked, and the lowest rank / class size win."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        key[rng.permutation(members)] = np.arange(len(members)) / len(members)
    order = np.lexsort((rng.random(len(labels)), key))  # ties (e.g. every class's first member) in random order
    return np.sort(order[:n])


def project(features: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, str]:
    """N x D -> (N x 2 coordinates in [0, 1], the method in words)."""
    from threadpoolctl import threadpool_limits

    # One thread: PCA + t-SNE of 1,000 oxford102 features took 3.4 s of CPU on one thread and 15-18 s on two (the
    # OpenMP workers wait on each other), 6-7 s against 22-36 s of wall time on a busy 2-core machine.
    with threadpool_limits(1):
        return _project(np.asarray(features, dtype=np.float64), seed)


def _project(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(x)
    if n < TSNE_MIN_POINTS:
        dims = min(2, n, x.shape[1])
        xy = np.zeros((n, 2))
        if n > 1:
            xy[:, :dims] = PCA(dims, random_state=seed).fit_transform(x)
        return _unit_box(xy), f"PCA to 2 dimensions (t-SNE needs at least {TSNE_MIN_POINTS} images)"
    dims = min(PCA_DIMS, n, x.shape[1])
    reduced = PCA(dims, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (n - 1) / 3)
    xy = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(reduced)
    return _unit_box(xy), f"t-SNE (perplexity {perplexity:.3g}) of the features after PCA to {dims} dimensions"


def _unit_box(xy: np.ndarray) -> np.ndarray:
    """Centred in [0, 1] x [0, 1], one scale for both axes, so distances keep their meaning."""
    low, high = xy.min(axis=0), xy.max(axis=0)
    scale = float((high - low).max()) or 1.0
    return (xy - (low + high) / 2) / scale + 0.5


def embedding_map(run_dir: Path, paths: list[str], true: np.ndarray, probs: np.ndarray, labels: list[str],
                  points: int, *, chunk_images: int = 256, workers: int = 0, quiet: bool = True,
                  network: RunNetwork | None = None) -> dict:
    """What the report's map section shows: `points`, the method, and a note; or only a note saying why there
    is no map. `paths`, `true` and `probs` are the scored images, their label ids and (calibrated) probabilities.
    `network`: the run's, when the evaluation already loaded it."""
    if RunDir(run_dir).is_ensemble:
        return {"note": "An ensemble has no single feature space, so there is no embedding map."}
    started = time.perf_counter()
    chosen = stratified_sample(true, points)
    network = network or RunNetwork(run_dir)
    kept, features, thumbs, notes = [], [], [], []
    for chunk in network.iter([paths[i] for i in chosen], chunk_images=chunk_images, workers=workers, quiet=quiet,
                              desc="map features", notes=notes):
        if chunk.indices:
            kept += [int(chosen[k]) for k in chunk.indices]
            features.append(chunk.features)
            thumbs += [base64.b64encode(thumbnail_jpeg(crop, THUMBNAIL, THUMBNAIL_QUALITY)).decode() for crop in chunk.crops]
    if not kept:  # every sampled image vanished since it was scored
        return {"note": "None of the sampled images could be read again, so there is no embedding map."}
    featured = time.perf_counter()
    if not quiet:  # t-SNE runs for seconds to a minute with no bar of its own
        print(f"map: placing {len(kept)} images (PCA, then t-SNE)", file=sys.stderr, flush=True)
    xy, method = project(np.concatenate(features))
    predicted = probs[kept].argmax(axis=1)
    rows = [[round(float(x), 4), round(float(y), 4), int(true[i]), int(p), round(float(probs[i, p]), 4),
             Path(paths[i]).name, thumb] for (x, y), i, p, thumb in zip(xy, kept, predicted, thumbs)]
    done = time.perf_counter()
    return {"classes": labels, "points": rows, "method": method, "scored": len(paths),
            "seconds": {"features": round(featured - started, 2), "projection": round(done - featured, 2)},
            **({"note": "; ".join(notes)} if notes else {})}


def map_summary(embedding: dict) -> dict:
    """metrics.json's "embedding_map": how many points, how they were placed and what it cost (or why no map)."""
    return {"points": len(embedding.get("points", [])), **{k: v for k, v in embedding.items()
                                                           if k not in ("points", "classes")}}
