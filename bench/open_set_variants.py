"""Which unknown score? The candidates measured side by side on the same features, to choose the one visiontune uses.

    .venv/bin/python bench/open_set_variants.py --json bench/out/open_set_variants.json     # ~40 min on 2 busy cores

The model and images are bench/open_set.py's: a flower_photos run, its test split (in distribution), oxford102's
test split without flower_photos' classes and look-alikes (unseen flowers), and 24 synthetic images. Pooled
features and logits come from one PyTorch pass (`models.features.logits_and_features`, centre crops) of every train,
val and test image and of the unseen and synthetic ones, cached in --work (features.npz). Each candidate is fitted on
a seeded sample of the train split (at most --per-class images a class, unless it says otherwise) and reported as
AUROC and false-accept at 95 % true-accept on the unseen flowers, and on the synthetic images the AUROC and the
share flagged at the threshold that accepts 95 % of the val split (the rule evaluation uses).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402
from open_set import DEFAULT_RUN, auroc, far_at_tar, rows, synthetic_images, unseen_images  # noqa: E402


def features(run: Path, work: Path) -> dict[str, np.ndarray]:
    """Logits and pooled features of every image set, computed once and cached."""
    cache = work / "features.npz"
    if cache.is_file():
        return dict(np.load(cache))
    from visiontune.data.loader import load_all
    from visiontune.data.transforms import center_crop, normalize
    from visiontune.models.bundle import load_bundle
    from visiontune.models.features import logits_and_features

    model, meta = load_bundle(run)
    spec = meta.preprocess
    sets = {split: rows(run / "split.csv", split) for split in ("train", "val", "test")}
    sets["unseen"] = list(zip(*unseen_images("test", None)))
    sets["synthetic"] = [(p, "synthetic") for p in synthetic_images(work / "synthetic")]
    out = {}
    for name, items in sets.items():
        started, logits, feats, labels = time.perf_counter(), [], [], []
        for start in range(0, len(items), 256):
            chunk = items[start:start + 256]
            decoded = load_all([p for p, _ in chunk], spec, quiet=True)
            ok = [k for k, image in enumerate(decoded.images) if image is not None]
            crops = np.stack([center_crop(decoded.images[k], spec.input_size) for k in ok])
            for b in range(0, len(crops), 64):
                z, f = logits_and_features(model, normalize(crops[b:b + 64], spec))
                logits.append(z)
                feats.append(f)
            labels += [meta.labels.index(chunk[k][1]) if chunk[k][1] in meta.labels else -1 for k in ok]
        out[f"{name}_logits"], out[f"{name}_features"] = np.concatenate(logits), np.concatenate(feats)
        out[f"{name}_labels"] = np.array(labels)
        print(f"  features of {len(labels)} {name} images in {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _sample(labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.choice(idx, per_class, replace=False)) if per_class and len(idx) > per_class else idx)
    return np.concatenate(keep)


def knn(train: np.ndarray, dims: int | None):
    """Cosine distance to the nearest training image; in `dims` centred principal components (None: raw features)."""
    if dims is None:
        refs = _unit(train)
        return lambda f: 1 - (_unit(f) @ refs.T).max(1)
    center = train.mean(0)
    _, _, vt = np.linalg.svd(train - center, full_matrices=False)
    u = vt[:dims].T
    refs = _unit((train - center) @ u)
    return lambda f: 1 - (_unit((f - center) @ u) @ refs.T).max(1)


def knn_k(train: np.ndarray, dims: int, k: int):
    center = train.mean(0)
    _, _, vt = np.linalg.svd(train - center, full_matrices=False)
    u = vt[:dims].T
    refs = _unit((train - center) @ u)
    return lambda f: 1 - np.sort(_unit((f - center) @ u) @ refs.T, axis=1)[:, -k]


def mahalanobis(train: np.ndarray, labels: np.ndarray, pca: int | None):
    """Distance to the nearest class mean under one shared Ledoit-Wolf covariance (Lee et al., 2018), in the full
    feature space or in `pca` principal components."""
    from sklearn.covariance import ledoit_wolf

    center = train.mean(0)
    u = np.linalg.svd(train - center, full_matrices=False)[2][:pca].T if pca else np.eye(train.shape[1])
    z = (train - center) @ u
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(0) for c in classes])
    covariance, _ = ledoit_wolf(z - means[np.searchsorted(classes, labels)], assume_centered=True)
    chol = np.linalg.cholesky(np.linalg.inv(covariance))

    def score(f):
        w = (f - center) @ u @ chol
        m = means @ chol
        return np.sqrt(np.maximum((w * w).sum(1)[:, None] - 2 * w @ m.T + (m * m).sum(1)[None], 0).min(1))
    return score


def from_logits(name: str, temperature: float):
    from scipy.special import logsumexp, softmax

    if name == "top probability":
        return lambda z: -softmax(z / temperature, axis=1).max(1)
    if name == "max logit":
        return lambda z: -z.max(1)
    return lambda z: -logsumexp(z, axis=1)  # energy


def main(argv: list[str] | None = None) -> dict:
    from visiontune.models.bundle import read_meta

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="a flower_photos run (read, never written)")
    parser.add_argument("--work", default="/tmp/visiontune-open-set-variants", help="features cache and images")
    parser.add_argument("--per-class", type=int, default=200, help="training images a class each candidate is fitted on")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    run, work = Path(args.run), Path(args.work)
    data = features(run, work)
    temperature = float((read_meta(run).extra.get("calibration") or {}).get("temperature", 1.0))
    train, labels = data["train_features"], data["train_labels"]
    pick = _sample(labels, args.per_class)

    candidates = {name: ("logits", from_logits(name, temperature)) for name in ("top probability", "max logit", "energy")}
    candidates["mahalanobis (1280 features)"] = ("features", mahalanobis(train[pick], labels[pick], None))
    candidates["mahalanobis (64 PCA)"] = ("features", mahalanobis(train[pick], labels[pick], 64))
    candidates["k-NN cosine (1280 features)"] = ("features", knn(train[pick], None))
    for dims in (8, 16, 32, 64):
        candidates[f"k-NN cosine ({dims} PCA, centred)"] = ("features", knn(train[pick], dims))
    candidates["5-NN cosine (16 PCA, centred)"] = ("features", knn_k(train[pick], 16, 5))
    for per_class in (50, 100, 400, None):
        sample = _sample(labels, per_class)
        candidates[f"k-NN cosine (16 PCA), {per_class or 'all'} a class"] = ("features", knn(train[sample], 16))

    results = {}
    for name, (kind, fn) in candidates.items():
        val, test, unseen, synthetic = (fn(data[f"{s}_{kind}"]) for s in ("val", "test", "unseen", "synthetic"))
        threshold = np.sort(val)[int(np.ceil(0.95 * len(val))) - 1]
        results[name] = {"unseen_auroc": auroc(test, unseen), "unseen_far_at_95_tar": far_at_tar(test, unseen),
                         "synthetic_auroc": auroc(test, synthetic),
                         "synthetic_flagged": float(np.mean(synthetic > threshold)),
                         "test_flagged": float(np.mean(test > threshold))}
    lines = ["| score | unseen flowers: AUROC | false-accept at 95 % true-accept | synthetic: AUROC | synthetic "
             "flagged | test flagged |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['unseen_auroc']:.3f} | {r['unseen_far_at_95_tar']:.1%} | "
                     f"{r['synthetic_auroc']:.3f} | {r['synthetic_flagged']:.0%} | {r['test_flagged']:.1%} |")
    print("\n".join(lines))
    out = {**describe(), "run": str(run.resolve()), "per_class": args.per_class, "temperature": temperature,
           "images": {s: int(len(data[f"{s}_labels"])) for s in ("train", "val", "test", "unseen", "synthetic")},
           "results": results}
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
