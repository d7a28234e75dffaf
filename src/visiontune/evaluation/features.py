"""A run's pooled features for a list of images: what its linear classifier sees, for the embedding map and
open-set scores.

ONNX exports (the default scoring engine) give logits only, so features come from one more pass of the run's own
network over the images asked for, decoded and centre-cropped exactly as scoring does. For more than a few images
that pass runs in ONNX Runtime over a graph traced for it, as training's frozen pass does: measured 8x faster than
PyTorch eager on 256 flower photos on a busy 2-core machine (6.5 s against 56 s, plus 8.5 s to trace). Images go
a chunk at a time, so memory stays flat however many are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from visiontune.data.loader import load_all
from visiontune.data.parallel import progress
from visiontune.data.transforms import Preprocess, center_crop, normalize
from visiontune.models.bundle import ModelMeta, load_bundle
from visiontune.models.features import logits_and_features
from visiontune.training.feature_cache import FrozenFeatures, FrozenRunner

# Images per model call: 16 was at least as fast as 8 and 32 in training's frozen pass on 2 cores.
BATCH = 16
# Fewer images than this run in PyTorch: tracing the graph (seconds) would cost more than ONNX Runtime saves.
ONNX_MIN_IMAGES = 128


@dataclass
class FeatureChunk:
    indices: list[int]  # positions in the list of paths of the images read, in order
    crops: np.ndarray  # N x S x S x 3 uint8: the centre crops the model saw
    logits: np.ndarray  # N x C
    features: np.ndarray  # N x D pooled pre-logit features
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason) of images that could not be read


def feature_runner(model, spec: Preprocess, onnx: bool, notes: list[str]) -> Callable[[np.ndarray], tuple]:
    """uint8 N x S x S x 3 crops -> (N x C logits, N x D pooled features) under `model` (from `load_bundle`), in
    ONNX Runtime when `onnx` (PyTorch where the architecture cannot be traced, with a note why)."""
    if not onnx:
        return lambda crops: logits_and_features(model, normalize(crops, spec))
    frozen = FrozenRunner(FrozenFeatures(model, None, None), spec, torch.device("cpu"), notes)
    classifier = model.get_classifier()

    def run(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, pooled = frozen(crops)
        with torch.inference_mode():
            return classifier(torch.from_numpy(pooled)).float().numpy(), pooled
    return run


def iter_features(model, spec: Preprocess, paths: list[str], *, chunk_images: int = 256, workers: int = 0,
                  quiet: bool = True, desc: str = "features", onnx: bool | None = None,
                  notes: list[str] | None = None, runner: Callable | None = None) -> Iterator[FeatureChunk]:
    """Decode, centre-crop and run `model` (a torch module from `load_bundle`) over `paths`, a chunk at a time.
    `onnx`: None chooses by the number of images. `runner`: one `feature_runner` already made, for callers that
    pass several lists through the same traced graph (then `model` and `onnx` are not used)."""
    run = runner or feature_runner(model, spec, len(paths) >= ONNX_MIN_IMAGES if onnx is None else onnx,
                                   notes if notes is not None else [])
    step = max(1, chunk_images)
    with progress(len(paths), desc, quiet) as bar:
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            decoded = load_all(chunk, spec, workers=workers, quiet=True)
            failed = dict(decoded.failed)
            kept = [k for k in range(len(chunk)) if k not in failed]
            failures = [(start + k, reason) for k, reason in decoded.failed]
            if kept:
                crops = np.stack([center_crop(decoded.images[k], spec.input_size) for k in kept])
                outs = [run(crops[b:b + BATCH]) for b in range(0, len(kept), BATCH)]
                yield FeatureChunk([start + k for k in kept], crops, np.concatenate([o[0] for o in outs]),
                                   np.concatenate([o[1] for o in outs]), failures)
            elif failures:
                yield FeatureChunk([], np.zeros((0, spec.input_size, spec.input_size, 3), np.uint8),
                                   np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), failures)
            bar.update(len(chunk))


class RunNetwork:
    """A run's network for feature passes, loaded once and traced at most once, however many passes share it (an
    evaluation's unknown-score fit and embedding map): loading takes a second and tracing several."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._bundle: tuple | None = None
        self._runners: dict[bool, tuple[Callable, list[str]]] = {}

    @property
    def meta(self) -> ModelMeta:
        return self._loaded()[1]

    def runner(self, onnx: bool, notes: list[str]) -> Callable[[np.ndarray], tuple]:
        """`feature_runner` of this network, made on first use; what making it noted goes into every caller's `notes`."""
        if onnx not in self._runners:
            made: list[str] = []
            self._runners[onnx] = (feature_runner(self._loaded()[0], self.meta.preprocess, onnx, made), made)
        run, made = self._runners[onnx]
        notes.extend(made)
        return run

    def iter(self, paths: list[str], *, onnx: bool | None = None, notes: list[str] | None = None,
             **kwargs) -> Iterator[FeatureChunk]:
        """`iter_features` over `paths` through this network (`onnx`: None chooses by the number of images)."""
        chosen = len(paths) >= ONNX_MIN_IMAGES if onnx is None else onnx
        run = self.runner(chosen, notes if notes is not None else [])
        return iter_features(None, self.meta.preprocess, paths, runner=run, **kwargs)

    def _loaded(self) -> tuple:
        if self._bundle is None:
            self._bundle = load_bundle(self.run_dir)
        return self._bundle
