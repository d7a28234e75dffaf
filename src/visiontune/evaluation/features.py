"""A run's pooled features for a list of images: what its linear classifier sees, for the embedding map and
open-set scores.

ONNX exports (the default scoring engine) give logits only, so features come from one more torch pass over the
images asked for, decoded and centre-cropped exactly as scoring does. Images go a chunk at a time, so memory
stays flat however many are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from visiontune.data.loader import load_all
from visiontune.data.parallel import progress
from visiontune.data.transforms import Preprocess, center_crop, normalize
from visiontune.models.features import logits_and_features

# Images per torch call: Lite0's early activations at batch 32 and 224 px are ~100 MB; far larger batches
# only add memory on a CPU.
TORCH_BATCH = 32


@dataclass
class FeatureChunk:
    indices: list[int]  # positions in the list of paths of the images read, in order
    crops: np.ndarray  # N x S x S x 3 uint8: the centre crops the model saw
    logits: np.ndarray  # N x C
    features: np.ndarray  # N x D pooled pre-logit features
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason) of images that could not be read


def iter_features(model, spec: Preprocess, paths: list[str], *, chunk_images: int = 256, workers: int = 0,
                  quiet: bool = True, desc: str = "features") -> Iterator[FeatureChunk]:
    """Decode, centre-crop and run `model` (a torch module from `load_bundle`) over `paths`, a chunk at a time."""
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
                outs = [logits_and_features(model, normalize(crops[b:b + TORCH_BATCH], spec))
                        for b in range(0, len(kept), TORCH_BATCH)]
                yield FeatureChunk([start + k for k in kept], crops, np.concatenate([o[0] for o in outs]),
                                   np.concatenate([o[1] for o in outs]), failures)
            elif failures:
                yield FeatureChunk([], np.zeros((0, spec.input_size, spec.input_size, 3), np.uint8),
                                   np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), failures)
            bar.update(len(chunk))

