"""The open-set ("unknown") score: how far an image's pooled features lie from every image the model was trained on.

The score is the cosine distance to the nearest training image (k-NN with k = 1, Sun et al., 2022), measured in the
top principal components of the training features, centred: 1 - max_j cos(P(x - c), P(x_j - c)), from 0 (the same
direction as a training image) to 2. Chosen by measurement (bench/open_set.py, BENCHMARKS.md) on a flower_photos
model against oxford102 flowers it never saw and against synthetic images: the Mahalanobis distance to the nearest
class mean (shared, shrunk covariance) could hardly tell unseen flowers from the test split (AUROC 0.57), as the
pooled features of another flower lie in the same region; on the raw 1280 features k-NN reached 0.81, and 0.83 in
16 centred principal components, which also flagged every uniform-noise image (which a high top probability, e.g.,
does not). A sample of the training images (a few hundred a class) is the reference set: 16 numbers an image.

It runs inside the model (`models/open_set_head.py`: the fit as buffers after the pooled features), so every engine
and every exported graph computes the same number, as a second output named `unknown_score` beside `logits`. This
module is the maths and the storage, without torch: an ONNX-only prediction never imports it. The fit lives in the
run's open_set.safetensors; model.json's "open_set" entry holds the threshold and the fingerprint of the fit it
belongs to, so a threshold is never applied to another fit's scores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visiontune.errors import ModelError
from visiontune.models.run_dir import RunDir

if TYPE_CHECKING:
    from visiontune.models.bundle import ModelMeta

OUTPUT = "unknown_score"  # the second output of a graph that carries the score
META_KEY = "open_set"  # model.json's entry: method, threshold, fingerprint, how it was chosen
METHOD = "knn-cosine-pca"
BUFFERS = ("center", "components", "references")


@dataclass
class OpenSetFit:
    """A fitted score as float32 arrays: score(x) = 1 - max_j (unit((x - center) @ components) . references[j])."""

    center: np.ndarray  # D: the training sample's mean
    components: np.ndarray  # D x K: its top principal directions
    references: np.ndarray  # M x K: the training sample, centred, projected and scaled to unit length

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    @property
    def fingerprint(self) -> str:
        """What model.json's threshold is tied to: a hash of the buffers' values."""
        digest = hashlib.sha256()
        for name in BUFFERS:
            array = np.ascontiguousarray(getattr(self, name), dtype=np.float32)
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]

    def score(self, features: np.ndarray) -> np.ndarray:
        """N x D pooled features -> N distances (float64), the formula `OpenSetHead` runs."""
        z = _unit((np.asarray(features, np.float64) - self.center) @ self.components.astype(np.float64))
        return np.maximum(1.0 - (z @ self.references.astype(np.float64).T).max(axis=1), 0.0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32) for name in BUFFERS}


EPS = 1e-12  # the smallest length a projected feature is divided by (F.normalize's default)


def _unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), EPS)


def auto_dims(classes: int) -> int:
    """The principal components the distance is measured in when none are asked for: one a class, at least 16.
    Fewer components than classes fold classes onto each other. Measured (BENCHMARKS.md, "A real unknown" and its
    held-out check): a 5-class flower_photos model was best at 16 (unseen flowers AUROC 0.832, every synthetic image
    flagged; 64 gave 0.828 and 67 %); a 51-class oxford102 model against its other 51 species reached 0.722 at 16,
    0.769 at 32, 0.779 at 51, 0.783 at 64 and 0.777-0.778 at 102-128, with every synthetic image flagged from 32 on."""
    return max(16, classes)


def fit_knn(features: np.ndarray, dims: int) -> OpenSetFit:
    """Fit on N x D training features (the reference set: every one of them is kept, as K numbers)."""
    x = np.asarray(features, np.float64)
    if len(x) < 2:
        raise ModelError(f"the unknown score needs at least two training images, got {len(x)}")
    center = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    k = max(1, min(dims, len(x) - 1, x.shape[1]))  # N centred points span at most N - 1 directions
    components = vt[:k].T
    return OpenSetFit(center.astype(np.float32), components.astype(np.float32),
                      _unit((x - center) @ components).astype(np.float32))


def accept_threshold(in_scores: np.ndarray, accept: float) -> float:
    """The smallest score at or below which at least `accept` of the in-distribution images fall."""
    scores = np.sort(np.asarray(in_scores, np.float64))
    index = min(len(scores) - 1, max(0, int(np.ceil(accept * len(scores))) - 1))
    return float(scores[index])


def separating_threshold(in_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """The threshold that best separates in-distribution images from known negatives: the largest score t that
    maximises Youden's J = (share of in-distribution scores <= t) - (share of negative scores <= t)."""
    inside = np.sort(np.asarray(in_scores, np.float64))
    negative = np.sort(np.asarray(negative_scores, np.float64))
    candidates = np.unique(np.concatenate([inside, negative]))
    j = (np.searchsorted(inside, candidates, side="right") / len(inside)
         - np.searchsorted(negative, candidates, side="right") / len(negative))
    return float(candidates[np.flatnonzero(j == j.max())[-1]])


# --- stored with the run -------------------------------------------------------------------------------------


def save_fit(folder: Path, fit: OpenSetFit) -> None:
    from safetensors.numpy import save

    from visiontune.files import atomic_write_bytes

    atomic_write_bytes(RunDir(folder).open_set, save(fit.to_arrays(), metadata={"method": METHOD}))


def read_fit(folder: Path) -> OpenSetFit | None:
    """The run's fitted score, or None when it has none."""
    path = RunDir(folder).open_set
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ModelError(f"{path}: damaged or not a safetensors file ({str(exc)[:200]})") from None
    missing = [name for name in BUFFERS if name not in arrays]
    if missing:
        raise ModelError(f"{path}: not an open-set score (missing {', '.join(missing)})")
    fit = OpenSetFit(*(arrays[name] for name in BUFFERS))
    d, k = fit.components.shape
    if fit.center.shape != (d,) or fit.references.ndim != 2 or fit.references.shape[1] != k:
        raise ModelError(f"{path}: its arrays' shapes do not fit together")
    return fit


def entry(meta: "ModelMeta") -> dict | None:
    """model.json's "open_set" entry when it carries a usable threshold."""
    value = meta.extra.get(META_KEY)
    if isinstance(value, dict) and isinstance(value.get("threshold"), (int, float)) and value["threshold"] >= 0:
        return value
    return None


def current_fit(folder: Path, meta: "ModelMeta") -> OpenSetFit | None:
    """The run's fit when model.json holds a threshold chosen for it (same fingerprint), else None: a fit written
    by an evaluation that did not finish, or a threshold of an earlier fit, is never paired with the wrong one."""
    stored = entry(meta)
    if stored is None:
        return None
    fit = read_fit(folder)
    return fit if fit is not None and stored.get("fingerprint") == fit.fingerprint else None


def for_graph(run_meta: "ModelMeta", graph_meta: "ModelMeta | None", has_score: bool) -> "ModelMeta":
    """The description a run directory runs with on an exported graph: the run's own, with the "open_set" entry of
    the fit inside that graph. When the graph holds the run's current fit, the run's entry (possibly a newer
    threshold, from a later evaluation) applies; when it holds an older fit, the graph's own entry does; a graph
    without the score gets none."""
    own, theirs = entry(run_meta), entry(graph_meta) if graph_meta is not None else None
    chosen = None
    if has_score and theirs is not None:
        chosen = own if own is not None and own.get("fingerprint") == theirs.get("fingerprint") else theirs
    extra = {k: v for k, v in run_meta.extra.items() if k != META_KEY}
    if chosen is not None:
        extra[META_KEY] = chosen
    return replace(run_meta, extra=extra)
