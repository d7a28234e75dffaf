"""The frozen part of the network, run once per image view and cached.

On a CPU the frozen pass is most of the cost of training, and it repeats: the frozen layers see the same
pixels every epoch. So each training image is cropped into a few augmented views once, pushed through the
frozen layers once, and the activations at the frozen/trainable boundary (float16) and the pooled features
(float32) are kept. On a CPU the frozen layers run in ONNX Runtime, measured several times faster than
PyTorch eager there; on a GPU, PyTorch runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.data.parallel import progress
from visiontune.data.transforms import Augment, Preprocess, augment_crop, center_crop, normalize
from visiontune.models.onnx_graph import first_line, open_session, trace

# Batch of the frozen pass: ONNX Runtime on 2 cores was fastest per image at small batches.
_FROZEN_BATCH = 8


class FrozenFeatures(nn.Module):
    """bottom -> boundary activation; (frozen) top -> pooled features. Both outputs, one pass."""

    def __init__(self, model: nn.Module, bottom: nn.Module | None, top: nn.Module | None):
        super().__init__()
        self.model, self.bottom, self.top = model, bottom, top

    def forward(self, x: torch.Tensor):
        if self.bottom is None:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        boundary = self.bottom(x)
        return boundary, self.model.forward_head(self.top(boundary), pre_logits=True)


class FrozenRunner:
    """Runs FrozenFeatures on numpy batches with ONNX Runtime (CPU) or PyTorch (GPU, or as a fallback)."""

    def __init__(self, net: FrozenFeatures, spec: Preprocess, device: torch.device, notes: list[str]):
        self.net = net.eval()
        self.device = device
        self.split = net.bottom is not None
        self.session = None
        if device.type == "cpu":
            self.session = self._onnx_session(spec, notes)

    def _onnx_session(self, spec: Preprocess, notes: list[str]):
        outputs = ["boundary", "pooled"] if self.split else ["pooled"]
        try:
            graph = trace(self.net, spec.input_size, ["x"], outputs)
        except Exception as exc:  # an architecture ONNX cannot express still trains, only slower
            notes.append(f"frozen pass runs in PyTorch (ONNX export failed: {first_line(exc)[:120]})")
            return None
        return open_session(graph, "the frozen layers", torch.get_num_threads())

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        if self.session is not None:
            out = self.session.run(None, {"x": batch})
        else:
            with torch.inference_mode():
                result = self.net(torch.from_numpy(batch).to(self.device))
                out = [t.float().cpu().numpy() for t in (result if self.split else (result,))]
        if self.split:
            return out[0].astype(np.float16), out[1].astype(np.float32)
        return None, out[0].astype(np.float32)


@dataclass
class ViewCache:
    """Frozen-pass outputs for `views` views of `n` images: index [view, image]."""

    boundary: np.ndarray | None  # views x n x C x H x W, float16 (None when the backbone is not split)
    pooled: np.ndarray  # views x n x F, float32


def view_crop(image: np.ndarray, view: int, index: int, seed: int, spec: Preprocess, aug: Augment) -> np.ndarray:
    """View 0 is the plain centre crop (what evaluation sees); view v > 0 is augmentation v of image `index`.

    The generator is seeded by (seed, view, index), so a view is the same whatever the batch or worker order.
    """
    if view == 0:
        return center_crop(image, spec.input_size)
    return augment_crop(image, spec, aug, np.random.default_rng([seed, view, index]))


def build_view_cache(images: list[np.ndarray], indices: np.ndarray, views: int, runner: FrozenRunner,
                     spec: Preprocess, aug: Augment, seed: int, *, desc: str, quiet: bool) -> ViewCache:
    """Run `views` views (0 = centre, then augmentations) of images[indices] through the frozen layers."""
    jobs = [(v, int(i)) for v in range(views) for i in indices]
    position = {int(i): k for k, i in enumerate(indices)}
    boundary = pooled = None

    def make_batch(chunk):
        crops = np.stack([view_crop(images[i], v, i, seed, spec, aug) for v, i in chunk])
        return chunk, normalize(crops, spec)

    chunks = [jobs[k:k + _FROZEN_BATCH] for k in range(0, len(jobs), _FROZEN_BATCH)]
    # One thread prepares the next batch of crops (Pillow releases the GIL) while the current one runs.
    with ThreadPoolExecutor(max_workers=1) as pool, progress(len(jobs), desc, quiet) as bar:
        pending = pool.submit(make_batch, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            chunk, batch = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(make_batch, chunks[k + 1])
            b, p = runner(batch)
            if pooled is None:
                pooled = np.zeros((views, len(indices), p.shape[1]), dtype=np.float32)
                if b is not None:
                    boundary = np.zeros((views, len(indices), *b.shape[1:]), dtype=np.float16)
            for row, (v, i) in enumerate(chunk):
                pooled[v, position[i]] = p[row]
                if boundary is not None:
                    boundary[v, position[i]] = b[row]
            bar.update(len(chunk))
    return ViewCache(boundary, pooled)


def cache_key(**parts) -> str:
    """A short digest of everything a cached activation depends on (file contents, model, weights,
    preprocessing, split point, views, augmentation, seed): change any of them and the key changes."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DiskCache:
    """View caches on disk as .npy files under folder/<key>/, memory-mapped when read back.

    Written to a temporary folder and renamed, so a killed run never leaves a half-written cache behind.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, key: str) -> ViewCache | None:
        entry = self.folder / key
        if not (entry / "pooled.npy").is_file():
            return None
        boundary = entry / "boundary.npy"
        return ViewCache(np.load(boundary, mmap_mode="r") if boundary.is_file() else None,
                         np.load(entry / "pooled.npy"))

    def save(self, key: str, cache: ViewCache) -> None:
        entry = self.folder / key
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "pooled.npy", cache.pooled)
        if cache.boundary is not None:
            np.save(tmp / "boundary.npy", cache.boundary)
        if entry.exists():
            shutil.rmtree(tmp)
            return
        os.replace(tmp, entry)
