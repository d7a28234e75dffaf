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
from visiontune.data.transforms import Augment, Preprocess, augment_crop, center_crop, eval_crop, normalize
from visiontune.files import is_disk_full
from visiontune.models.onnx_graph import first_line, open_session, simplify, trace
from visiontune.models.static_pad import with_static_padding

# Batch of the frozen pass: 16 was at least as fast as 8 and 32 on 2 cores (bench/frozen_pass.py).
_FROZEN_BATCH = 16


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


class FromPixels(nn.Module):
    """uint8 N x S x S x 3 crops in, normalised with the model's mean and std inside the graph: ONNX Runtime does in
    microseconds what numpy took longer than the frozen layers themselves for (a strided float copy per view)."""

    def __init__(self, net: nn.Module, spec: Preprocess):
        super().__init__()
        self.net = net
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)))
        self.register_buffer("shift", -torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1) / torch.tensor(
            spec.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor):
        return self.net(pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift)


class FrozenRunner:
    """Runs FrozenFeatures on uint8 crops with ONNX Runtime (CPU) or PyTorch (GPU, or as a fallback)."""

    def __init__(self, net: FrozenFeatures, spec: Preprocess, device: torch.device, notes: list[str]):
        self.net = net.eval()
        self.spec = spec
        self.device = device
        self.split = net.bottom is not None
        self.session = None
        if device.type == "cpu":
            self.session = self._onnx_session(spec, notes)

    def _onnx_session(self, spec: Preprocess, notes: list[str]):
        outputs = ["boundary", "pooled"] if self.split else ["pooled"]
        try:
            # Static "same" padding and folded constants: the graph the exporter makes, ~3x faster than a plain trace.
            net = FromPixels(with_static_padding(self.net, spec.input_size), spec).eval()
            example = torch.zeros(1, spec.input_size, spec.input_size, 3, dtype=torch.uint8)
            graph = simplify(trace(net, example, ["x"], outputs)).SerializeToString()
        except Exception as exc:  # an architecture ONNX cannot express still trains, only slower
            notes.append(f"frozen pass runs in PyTorch (ONNX export failed: {first_line(exc)[:120]})")
            return None
        # Idle ONNX Runtime threads sleep instead of spinning, leaving the cycles to the thread cropping the next
        # batch (measured as fast as spinning threads, BENCHMARKS.md "frozen pass").
        return open_session(graph, "the frozen layers", torch.get_num_threads(), spinning=False)

    def __call__(self, crops: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """uint8 N x S x S x 3 crops -> (boundary activations float16 or None, pooled features float32)."""
        if self.session is not None:
            out = self.session.run(None, {"x": np.ascontiguousarray(crops)})
        else:
            with torch.inference_mode():
                result = self.net(torch.from_numpy(normalize(crops, self.spec)).to(self.device))
                out = [t.float().cpu().numpy() for t in (result if self.split else (result,))]
        if self.split:
            return out[0].astype(np.float16), out[1].astype(np.float32)
        return None, out[0].astype(np.float32)


@dataclass
class ViewCache:
    """Frozen-pass outputs for `views` views of `n` images: index [view, image]."""

    boundary: np.ndarray | None  # views x n x C x H x W, float16 (None when the backbone is not split)
    pooled: np.ndarray  # views x n x F, float32


def view_crop(image: np.ndarray, view: int, index: int, seed: int, spec: Preprocess, aug: Augment | None) -> np.ndarray:
    """View 0 is the plain centre crop (what evaluation sees); view v > 0 is augmentation v of image `index`.

    The generator is seeded by (seed, view, index), so a view is the same whatever the batch or worker order.
    """
    if view == 0:
        # decoded images come resized for the model's input size; views at another size are resized again
        return center_crop(image, spec.input_size) if min(image.shape[:2]) == spec.resize_size else eval_crop(image, spec)
    return augment_crop(image, spec, aug, np.random.default_rng([seed, view, index]))


def build_view_cache(images: list[np.ndarray], indices: np.ndarray, views: int, runner: FrozenRunner,
                     spec: Preprocess, aug: Augment | None, seed: int, *, desc: str, quiet: bool) -> ViewCache:
    """Run `views` views (0 = centre, then augmentations) of images[indices] through the frozen layers."""
    jobs = [(v, int(i)) for v in range(views) for i in indices]
    position = {int(i): k for k, i in enumerate(indices)}
    boundary = pooled = None

    def make_batch(chunk):
        return chunk, np.stack([view_crop(images[i], v, i, seed, spec, aug) for v, i in chunk])

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


def weights_identity(timm_name: str, weights: str | None = None, from_scratch: bool = False, seed: int = 0) -> str:
    """What the backbone's weights are, for cache keys: a file by its content, timm's pretrained ones by name."""
    if from_scratch:
        return f"scratch:{seed}"
    if weights:
        return f"file:{hashlib.blake2b(Path(weights).read_bytes(), digest_size=16).hexdigest()}"
    return f"pretrained:{timm_name}"


def view_cache_key(digests: list[str], weights: str, spec: Preprocess, split_at: int, views: int, aug: Augment | None,
                   seed: int) -> str:
    """The key of the views of the files with content `digests`, in that order. With one view (the centre crop,
    no augmentation) neither the augmentation nor the seed matters, so they stay out of the key."""
    return cache_key(files=list(digests), weights=weights, preprocess=spec.to_dict(), split_at=split_at, views=views,
                     augment=aug if views > 1 else None, seed=seed if views > 1 else None)


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

    def save(self, key: str, cache: ViewCache) -> bool:
        """Keep `cache` for the next run; False when the disk is full (the run goes on with it in memory: a
        cache is worth less than the space the checkpoints need)."""
        entry = self.folder / key
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            np.save(tmp / "pooled.npy", cache.pooled)
            if cache.boundary is not None:
                np.save(tmp / "boundary.npy", cache.boundary)
        except BaseException as exc:
            full = is_disk_full(exc, self.folder)  # before the space the half-written cache took is freed
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                return False
            raise
        if entry.exists():
            shutil.rmtree(tmp)
            return True
        os.replace(tmp, entry)
        return True
