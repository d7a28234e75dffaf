"""One classifier API over PyTorch, TorchScript and ONNX Runtime.

Images reach the model through `data.loader.load_for_model`, the function training evaluates with, so a
prediction sees exactly the pixels validation saw. Probabilities are softmax(logits / temperature), with
the temperature and the "uncertain" threshold that evaluation stores in model.json. A model that carries the
open-set score (`models/open_set.py`) also says whether an image is `unknown`: far from every class it was trained
on, by the threshold model.json stores beside it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from visiontune.config import ExplainConfig, InferenceConfig, default_workers
from visiontune.data.decode import ImageSource, describe_source
from visiontune.data.loader import load_for_model, load_resized
from visiontune.data.transforms import Preprocess, tta_views
from visiontune.errors import ConfigError, ImageDecodeError
from visiontune.inference.backends import LoadedModel
from visiontune.inference.resolve import open_model
from visiontune.inference.voting import entropy_of, softmax
from visiontune.models import open_set


@dataclass
class Prediction:
    """One image's answer; `error` is set (and the rest empty) when the image could not be read."""

    source: str
    top_k: list[tuple[str, float]] = field(default_factory=list)
    entropy: float | None = None  # of the full distribution, in nats
    uncertain: bool | None = None  # top probability below the model's threshold
    unknown: bool | None = None  # unknown score above the model's threshold; None: the model has no such score
    unknown_score: float | None = None  # distance to the nearest trained class, in the model's feature space
    error: str | None = None
    # Multi-label models: the labels whose probability reaches their threshold, most probable first (None for a
    # one-label model; empty when no label passes, shown as "none").
    chosen: list[tuple[str, float]] | None = None

    @property
    def label(self) -> str | None:
        if self.chosen is not None and self.ok:
            return "|".join(name for name, _ in self.chosen) or "none"
        return self.top_k[0][0] if self.top_k else None

    @property
    def probability(self) -> float | None:
        return self.top_k[0][1] if self.top_k else None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"source": self.source, "label": self.label, "probability": self.probability,
                "top_k": [{"label": name, "probability": p} for name, p in self.top_k],
                "entropy": self.entropy, "uncertain": self.uncertain, "unknown": self.unknown,
                "unknown_score": self.unknown_score, "error": self.error,
                **({"labels": [{"label": name, "probability": p} for name, p in self.chosen]}
                   if self.chosen is not None else {})}


class Classifier:
    """Load with `Classifier.load(path)`; call `predict`, `probabilities` or `logits`."""

    def __init__(self, model: LoadedModel, *, batch_size: int = InferenceConfig.batch_size):
        self.model = model
        self.engine = model.engine
        self.meta = model.meta
        self.labels: list[str] = list(model.meta.labels)
        self.preprocess: Preprocess = model.meta.preprocess
        self.path = model.path
        self.backend = model.backend
        self.engine_name = model.name
        self.metrics = model.metrics
        self.batch_size = max(1, int(batch_size))
        uncertainty = model.meta.extra.get("uncertainty") or {}
        self.temperature: float = model.temperature
        self.threshold: float = float(uncertainty.get("threshold", InferenceConfig.threshold))
        stored = open_set.entry(model.meta)
        self.unknown_threshold: float | None = float(stored["threshold"]) if stored else None
        self.task: str = model.meta.task
        self.thresholds = np.array(model.meta.thresholds, dtype=np.float64)
        self._explainer = None  # built on the first `explain`, kept for the next with the same method and layer
        self._explainer_key: tuple | None = None

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, engine={self.engine_name!r}, classes={len(self.labels)})"

    @property
    def is_ensemble(self) -> bool:
        return self.model.takes_crops

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, *, precision: str = "fp32",
             threads: int = InferenceConfig.threads, batch_size: int = InferenceConfig.batch_size,
             spinning: bool = True, streams: int = 1) -> "Classifier":
        """A run directory, an ensemble directory, a .onnx file or a TorchScript file (see `resolve.open_model`).

        backend: "torch" or "onnx". Defaults: "onnx" for a .onnx file, "torch" for a run directory (where
        "onnx" uses its export at `precision` if present, else exports fp32 in memory).
        """
        model = open_model(path, backend, precision=precision, threads=threads, batch_size=batch_size,
                           spinning=spinning, streams=streams)
        return cls(model, batch_size=batch_size)

    # ----------------------------------------------------------------- numbers
    def logits(self, crops: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 eval crops (`load_for_model` output) -> float32 N x C raw logits."""
        return self.outputs(crops)[0]

    def outputs(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Like `logits`, with each crop's unknown score (float32 N; None when the model has no such score)."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        size = self.preprocess.input_size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise ConfigError(f"expected N x {size} x {size} x 3 crops for this model, got shape {tuple(crops.shape)}")
        if len(crops) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32), None
        out = [self.model.crop_outputs(crops[i:i + self.batch_size]) for i in range(0, len(crops), self.batch_size)]
        scores = None if out[0][1] is None else np.concatenate([s.reshape(-1) for _, s in out]).astype(np.float32)
        return np.concatenate([z for z, _ in out]).astype(np.float32, copy=False), scores

    def view_logits(self, views: Sequence[np.ndarray]) -> np.ndarray:
        """One K x S x S x 3 stack of crops per image -> float32 N x C: each image's logits averaged over its
        views (test-time augmentation, in logit space so the model's temperature applies unchanged)."""
        return self.view_outputs(views)[0]

    def view_outputs(self, views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Like `view_logits`, with each image's unknown score: its first view's (the centre crop, which the
        threshold was chosen on; corner crops of a known class look less typical)."""
        if not views:
            return np.zeros((0, len(self.labels)), dtype=np.float32), None
        counts = np.array([len(v) for v in views])
        starts = np.cumsum(counts) - counts
        z, scores = self.outputs(np.concatenate(views))
        logits = (np.add.reduceat(z, starts, axis=0) / counts[:, None]).astype(np.float32)
        return logits, (None if scores is None else scores[starts])

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """softmax(logits / temperature), float32 N x C (a multi-label model: a sigmoid per label)."""
        return self.to_probabilities(self.logits(crops))

    def to_probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.task == "multilabel":
            return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        return softmax(logits, self.temperature)

    def probabilities_and_scores(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(softmax(logits / temperature), unknown scores or None), from one model call."""
        logits, scores = self.outputs(crops)
        return self.to_probabilities(logits), scores

    # ----------------------------------------------------------------- images
    def predict(self, images: ImageSource | Sequence[ImageSource], top_k: int = InferenceConfig.top_k,
                tta: bool = False, *, workers: int = InferenceConfig.decode_workers) -> list[Prediction]:
        """Paths, bytes, PIL images or H x W x 3 arrays (one, or a list) -> one Prediction each, in order.

        An image that cannot be read gets a Prediction with `error` set; the others are still predicted.
        """
        return list(self.iter_predict(_as_list(images), top_k=top_k, tta=tta, workers=workers))

    def iter_predict(self, images: Iterable[ImageSource], top_k: int = InferenceConfig.top_k, tta: bool = False,
                     *, workers: int = InferenceConfig.decode_workers) -> Iterator[Prediction]:
        """Like `predict`, streaming: decodes a few batches ahead, so memory stays flat on large folders."""
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        top_k = min(top_k, len(self.labels))
        load = self._tta_views if tta else self._one_view
        chunk = self.batch_size * 4
        pool = None  # started only when there is more than one image to decode at a time
        try:
            pending: list[tuple[str, ImageSource]] = []
            for index, source in enumerate(images):
                pending.append((describe_source(source, index), source))
                if len(pending) == chunk:
                    pool = pool or ThreadPoolExecutor(max_workers=default_workers(workers))
                    yield from self._predict_chunk(pending, pool, load, top_k)
                    pending = []
            if pending:
                if len(pending) > 1 and default_workers(workers) > 1:
                    pool = pool or ThreadPoolExecutor(max_workers=default_workers(workers))
                yield from self._predict_chunk(pending, pool, load, top_k)
        finally:
            if pool is not None:
                pool.shutdown()

    def _predict_chunk(self, items, pool, load, top_k) -> list[Prediction]:
        decode = lambda item: _try(load, item[1])  # noqa: E731
        decoded = list(pool.map(decode, items)) if pool is not None else [decode(item) for item in items]
        logits, scores = self.view_outputs([d for d in decoded if isinstance(d, np.ndarray)])
        probs = iter(self.to_probabilities(logits))
        scores = iter(scores if scores is not None else [None] * len(logits))
        results = []
        for (where, _), d in zip(items, decoded):
            if isinstance(d, str):
                results.append(Prediction(where, error=d))
                continue
            results.append(self._prediction(where, next(probs), top_k, next(scores)))
        return results

    def _prediction(self, where: str, p: np.ndarray, top_k: int, score: float | None = None) -> Prediction:
        order = np.argsort(-p, kind="stable")[:top_k]
        top = [(self.labels[i], float(p[i])) for i in order]
        if self.task == "multilabel":  # the set above each label's threshold; entropy and "uncertain" are softmax's
            passed = [i for i in np.argsort(-p, kind="stable") if p[i] >= self.thresholds[i]]
            return Prediction(where, top, chosen=[(self.labels[i], float(p[i])) for i in passed])
        entropy = float(entropy_of(p[None])[0])
        score = None if score is None else float(score)
        unknown = None if score is None or self.unknown_threshold is None else bool(score > self.unknown_threshold)
        return Prediction(where, top, entropy, bool(top[0][1] < self.threshold), unknown, score)

    def _one_view(self, source: ImageSource) -> np.ndarray:
        return load_for_model(source, self.preprocess)[None]

    def _tta_views(self, source: ImageSource) -> np.ndarray:
        return tta_views(load_resized(source, self.preprocess), self.preprocess.input_size)

    # ----------------------------------------------------------------- explanations
    def explain(self, image: ImageSource, method: str = ExplainConfig.method, target: str | int | None = None, *,
                top_k: int = InferenceConfig.top_k, layer: str | None = None):
        """Grad-CAM (or `method`) for one image -> `visiontune.explain.gradcam.Explanation` (heat map,
        overlay, the model's top-k). `target`: the class to explain (default: the predicted one).

        Gradients need the PyTorch model, so the classifier must come from a run directory; an exported
        .onnx or TorchScript file raises ModelError saying so.
        """
        from visiontune.explain.runner import load_explainer

        key = (method, layer)
        if self._explainer_key != key:
            self._explainer, self._explainer_key = load_explainer(self.path, method, layer), key
        explainer = self._explainer
        explainer.temperature = self.temperature
        crop = load_for_model(image, self.preprocess)[None]
        return explainer.explain(crop, [explainer.target_index(target)], top_k=min(top_k, len(self.labels)),
                                 sources=[describe_source(image, 0)])[0]


def _try(load, source: ImageSource) -> np.ndarray | str:
    try:
        return load(source)
    except ImageDecodeError as exc:
        return exc.reason
    except TypeError as exc:  # an object that is not an image source at all
        return str(exc)


def _as_list(images) -> list:
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    return list(images)
