"""The run's own images for an export's checks, and the reference outputs they are compared with: a test sample
(eval crop) for parity, a training sample for INT8 calibration."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from visiontune.config import SPLITS, ExportConfig
from visiontune.data.index import load_dataset
from visiontune.data.loader import load_for_model
from visiontune.data.transforms import normalize
from visiontune.errors import ExportError, ImageDecodeError
from visiontune.export import parity
from visiontune.export.onnx import INPUT
from visiontune.models.bundle import ModelMeta
from visiontune.models.onnx_graph import open_session
from visiontune.models.open_set_head import split_outputs
from visiontune.models.run_dir import RunDir

_BATCH = 16


class RunImages:
    """The run's own images, eval-cropped: a test sample for parity, a training sample for calibration."""

    def __init__(self, run: Path, meta: ModelMeta, cfg: ExportConfig):
        split_file = RunDir(run).split
        if not split_file.is_file():
            raise ExportError(f"{run}: {RunDir.SPLIT} is missing; the parity check needs the run's own images")
        self.meta, self.cfg = meta, cfg
        self.dataset = load_dataset(split_file)
        names = list(self.dataset.classes)
        # The manifest's class order is its own; map every label through the model's labels.
        self.to_model = np.array([meta.labels.index(n) if n in meta.labels else -1 for n in names])
        rng = np.random.default_rng(cfg.seed)
        self.parity_split, idx = self._pick(("test", "val", "train"), cfg.parity_images, rng)
        crops, keep = self._load(idx)
        if not len(crops):
            raise ExportError(f"{split_file}: none of the {self.parity_split} images could be read for the parity check")
        self.parity_crops = crops
        # A multi-label image has no one true class to score top-1 against: its parity is the logits' alone.
        self.parity_labels = None if meta.task == "multilabel" else self.to_model[self.dataset.labels[keep]]
        self._rng = rng

    def _pick(self, order, limit: int, rng) -> tuple[str, np.ndarray]:
        for name in order:
            idx = np.flatnonzero(self.dataset.splits == SPLITS.index(name))
            if len(idx):
                if limit and len(idx) > limit:
                    idx = np.sort(rng.choice(idx, limit, replace=False))
                return name, idx
        raise ExportError(f"{self.dataset.source}: lists no images")

    def _load(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def one(i):
            try:
                return load_for_model(self.dataset.abspath(int(i)), self.meta.preprocess)
            except ImageDecodeError:
                return None

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(one, idx))
        keep = np.array([i for i, c in zip(idx, loaded) if c is not None], dtype=np.int64)
        crops = [c for c in loaded if c is not None]
        size = self.meta.preprocess.input_size
        return (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)), keep

    def parity_batches(self) -> list[np.ndarray]:
        return _batches(self.parity_crops, self.meta)

    def calibration_batches(self) -> list[np.ndarray]:
        _, idx = self._pick(("train", "val", "test"), self.cfg.calibration_images, self._rng)
        crops, _ = self._load(idx)
        return _batches(crops, self.meta)


def _batches(crops: np.ndarray, meta: ModelMeta) -> list[np.ndarray]:
    return [normalize(crops[i:i + _BATCH], meta.preprocess) for i in range(0, len(crops), _BATCH)]


def stack(outputs: list) -> parity.Outputs:
    """Per-batch (logits, scores or None) -> one `parity.Outputs`."""
    logits = np.concatenate([np.asarray(o[0], np.float32) for o in outputs])
    scores = None if outputs and outputs[0][1] is None else np.concatenate([np.asarray(o[1], np.float32).reshape(-1)
                                                                             for o in outputs])
    return parity.Outputs(logits, scores)


def torch_logits(model, batches: list[np.ndarray]) -> parity.Outputs:
    import torch

    with torch.inference_mode():
        outputs = [split_outputs(model(torch.from_numpy(b))) for b in batches]
    return stack([(z.float().numpy(), None if s is None else s.float().numpy()) for z, s in outputs])


def onnx_logits(data: bytes, images: RunImages) -> parity.Outputs:
    session = open_session(data, "the exported graph")
    outputs = [session.run(None, {INPUT: b}) for b in images.parity_batches()]
    return stack([(out[0], out[1] if len(out) > 1 else None) for out in outputs])


def torchscript_logits(data: bytes, images: RunImages) -> parity.Outputs:
    import io
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return torch_logits(module, images.parity_batches())
