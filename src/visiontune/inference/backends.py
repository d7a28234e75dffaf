"""Engines that turn a normalised N x 3 x S x S float32 batch into N x C float32 logits.

Each one is opened from what a user points at (a run folder, a .onnx file, a TorchScript file) and knows
nothing of labels or preprocessing: `Classifier` adds those.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from visiontune.config import InferenceConfig
from visiontune.errors import ModelError


def default_threads(threads: int = InferenceConfig.threads) -> int:
    return threads if threads > 0 else max(1, os.cpu_count() or 1)


class TorchBackend:
    name = "torch"

    def __init__(self, module, where: str):
        self.module = module
        self.where = where

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        return out.float().numpy()


def session_options(threads: int = InferenceConfig.threads, spinning: bool = True):
    """`spinning=False`: idle intra-op threads sleep instead of busy-waiting for the next call. A server
    wants that: the cores they would burn decode the next requests' images (measured: ~40 % less CPU per
    image for Lite0 INT8 at batch 8 on 2 cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = default_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # ORT's own warnings (unused initialisers, ...) are not the user's business
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxBackend:
    name = "onnx"

    def __init__(self, model: str | Path | bytes, where: str, threads: int = InferenceConfig.threads, *,
                 spinning: bool = True):
        import onnxruntime as ort

        self.where = where
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, session_options(threads, spinning), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for a damaged or foreign file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{where}: not a readable ONNX model (truncated or damaged? {first})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelError(f"{where}: expected one N x 3 x H x W image input, found "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.threads = default_threads(threads)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0].astype(np.float32, copy=False)


def load_torchscript(path: Path) -> tuple[object, str]:
    """(scripted module, model.json text stored beside it in the archive)."""
    import warnings

    import torch

    extra = {"model.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            # TorchScript archives are read by TorchScript's own loader, which restores only tensors and the
            # compiled graph (no arbitrary Python objects), unlike torch.load's pickle path.
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable TorchScript model ({first})") from None
    text = extra["model.json"]
    return module.eval(), text.decode() if isinstance(text, bytes) else text
