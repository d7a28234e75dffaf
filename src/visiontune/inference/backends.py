"""Engines that turn a normalised N x 3 x S x S float32 batch into N x C float32 logits, and `LoadedModel`:
an engine together with the description (labels, preprocessing, calibration) of the model it runs. An ONNX
engine whose graph normalises (`takes_pixels`, see `pixel_input`) takes the uint8 N x S x S x 3 crops instead;
`LoadedModel.engine_input` gives any engine what it takes.

`engine(batch)` gives the logits; `engine.run(batch)` gives (logits, unknown scores), the scores None when the
model carries no open-set score (a model made before it existed, or never evaluated).

An engine knows nothing of labels or preprocessing; `LoadedModel.crop_logits` adds the preprocessing, and
`Classifier` the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.config import InferenceConfig, default_workers
from visiontune.data.transforms import normalize
from visiontune.errors import ModelError
from visiontune.export.metadata import OUTPUT as LOGITS
from visiontune.models.bundle import ModelMeta
from visiontune.models.onnx_graph import first_line, open_session
from visiontune.models.open_set import OUTPUT as SCORE
from visiontune.models.run_dir import RunDir


@dataclass
class LoadedModel:
    """What `inference.resolve.open_model` hands over: an engine and the model it runs."""

    engine: object  # a backend below (normalised batch -> logits) or an ensemble vote (uint8 crops -> logits)
    meta: ModelMeta
    path: Path | None
    backend: str  # "torch" or "onnx" (an ensemble: its members')
    name: str  # what runs, for people: "onnx int8", "pytorch fp32", "ensemble of 3 (onnx fp32)", ...
    metrics: dict = field(default_factory=dict)  # the run's metrics.json, or the export's copy of it

    @property
    def takes_crops(self) -> bool:
        """An ensemble vote prepares each member's input itself, from the uint8 crops."""
        return hasattr(self.engine, "members")

    @property
    def temperature(self) -> float:
        return float((self.meta.extra.get("calibration") or {}).get("temperature", 1.0))

    def engine_input(self, crops: np.ndarray) -> np.ndarray:
        """What the engine takes for these uint8 crops: the crops themselves when its graph normalises them, else
        the normalised float32 tensor."""
        if getattr(self.engine, "takes_pixels", False):
            return crops if crops.ndim == 4 else crops[None]
        return normalize(crops, self.meta.preprocess)

    def crop_logits(self, crops: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 crops made with this model's preprocessing -> float32 N x C raw logits."""
        if self.takes_crops:
            return self.engine.logits(crops)
        return self.engine(self.engine_input(crops))

    def crop_outputs(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Like `crop_logits`, with each crop's unknown score (None when the model has none: an ensemble, or a
        model without the score)."""
        run = getattr(self.engine, "run", None)
        if self.takes_crops or run is None:
            return self.crop_logits(crops), None
        return run(self.engine_input(crops))


class TorchBackend:
    name = "torch"

    def __init__(self, module, where: str):
        self.module = module
        self.where = where

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        if isinstance(out, (tuple, list)):  # a model with the unknown score: (logits, score)
            return out[0].float().numpy(), (out[1].float().numpy() if len(out) > 1 else None)
        return out.float().numpy(), None


class OnnxBackend:
    name = "onnx"

    def __init__(self, model: str | Path | bytes, where: str, threads: int = InferenceConfig.threads, *,
                 spinning: bool = True, takes_pixels: bool = False):
        """`takes_pixels`: `model` is a graph made by `pixel_input.with_pixel_input` (uint8 crops in)."""
        self.where = where
        self.session = open_session(model, where, threads, spinning=spinning)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelError(f"{where}: expected one N x 3 x H x W image input, found "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.takes_pixels = takes_pixels
        self.input_type = np.uint8 if takes_pixels else np.float32
        names = [o.name for o in self.session.get_outputs()]
        # Exports name their outputs; a graph made elsewhere has its logits first.
        self.outputs = [LOGITS if LOGITS in names else names[0]] + ([SCORE] if SCORE in names else [])
        self.threads = default_workers(threads)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.takes_pixels and batch.dtype != np.uint8:
            raise TypeError(f"{self.where}: this engine takes uint8 crops, not {batch.dtype} (LoadedModel.engine_input)")
        out = self.session.run(self.outputs, {self.input_name: np.ascontiguousarray(batch, dtype=self.input_type)})
        return out[0].astype(np.float32, copy=False), (out[1].astype(np.float32) if len(out) > 1 else None)


class OpenVinoBackend:
    """An OpenVINO IR compiled for the CPU (see `export.openvino.compile_ir`)."""

    name = "openvino"

    def __init__(self, model: str | Path | object, where: str, threads: int = InferenceConfig.threads,
                 streams: int = 1):
        from visiontune.export.openvino import compile_ir

        self.where = where
        self.threads = default_workers(threads)
        self.model, self._run = compile_ir(model, where, self.threads, streams)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self._run(batch)


class TfliteBackend:
    """A .tflite flatbuffer on LiteRT's CPU interpreter (see `export.tflite.interpreter`)."""

    name = "tflite"

    def __init__(self, model: str | Path | bytes, where: str, threads: int = InferenceConfig.threads):
        from visiontune.export.tflite import interpreter

        self.where = where
        self.threads = default_workers(threads)
        self._run = interpreter(model, where, self.threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self._run(batch)


def load_torchscript(path: Path) -> tuple[object, str]:
    """(scripted module, model.json text stored beside it in the archive)."""
    import warnings

    import torch

    extra = {RunDir.META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            # TorchScript archives are read by TorchScript's own loader, which restores only tensors and the
            # compiled graph (no arbitrary Python objects), unlike torch.load's pickle path.
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable TorchScript model ({first_line(exc)})") from None
    text = extra[RunDir.META]
    return module.eval(), text.decode() if isinstance(text, bytes) else text
