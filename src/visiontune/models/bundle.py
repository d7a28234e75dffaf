"""The model bundle: model.safetensors (weights) + model.json (architecture, labels, preprocessing, versions).

Everything downstream (evaluation, export, explain, inference, serving) loads a model through here and
needs nothing from training. No pickle anywhere: a bundle can be loaded from an untrusted source.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from visiontune.data.transforms import Preprocess
from visiontune.errors import ModelError
from visiontune.files import atomic_write_bytes, atomic_write_text
from visiontune.models.run_dir import RunDir
from visiontune.version import __version__

if TYPE_CHECKING:  # torch is imported where weights are touched: reading model.json (an ONNX-only
    from torch import nn  # prediction or server) should not cost torch's start-up time and memory

FORMAT = "visiontune-model"
FORMAT_VERSION = 1


@dataclass
class ModelMeta:
    """What model.json holds; `extra` keeps keys added by later stages (calibration, thresholds)."""

    backbone: str
    timm_name: str
    labels: list[str]
    preprocess: Preprocess
    dropout: float = 0.0
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    img_size: int | None = None  # the input size the architecture was built for, when it is built per size (ViT)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": {"backbone": self.backbone, "timm_name": self.timm_name,
                             "num_classes": self.num_classes, "dropout": self.dropout,
                             **({"img_size": self.img_size} if self.img_size else {})},
            "id2label": {str(i): name for i, name in enumerate(self.labels)},
            "preprocess": self.preprocess.to_dict(),
            "versions": self.versions,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ModelMeta":
        check_format(data, where, FORMAT, FORMAT_VERSION, "model")
        try:
            arch = data["architecture"]
            id2label = data["id2label"]
            labels = [id2label[str(i)] for i in range(len(id2label))]
            known = {"format", "format_version", "architecture", "id2label", "preprocess", "versions"}
            return cls(arch["backbone"], arch["timm_name"], labels, Preprocess.from_dict(data["preprocess"]),
                       float(arch.get("dropout", 0.0)), data.get("versions", {}),
                       {k: v for k, v in data.items() if k not in known},
                       int(arch["img_size"]) if arch.get("img_size") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: malformed model description (missing or bad {exc})") from None


def check_format(data, where: str, fmt: str, version: int, kind: str) -> None:
    """Refuse a JSON description (`data`, read from `where`) that is not `fmt` at `version`."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ModelError(f"{where}: not a visiontune {kind} description (no \"format\": \"{fmt}\")")
    if data.get("format_version") != version:
        raise ModelError(f"{where}: {kind} format version {data.get('format_version')} is not supported "
                         f"by this visiontune (reads version {version})")


def current_versions() -> dict:
    import timm
    import torch

    return {"visiontune": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def save_bundle(folder: Path, model: nn.Module, meta: ModelMeta) -> None:
    """Write weights and description, each atomically, so a killed process leaves the previous good pair."""
    from safetensors.torch import save

    run = RunDir(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run.weights, save(state))
    write_meta(run.path, meta)


def write_meta(folder: Path, meta: ModelMeta) -> None:
    atomic_write_text(RunDir(folder).meta, json.dumps(meta.to_dict(), indent=2) + "\n")


def read_meta(folder: Path) -> ModelMeta:
    path = RunDir(folder).meta
    if not path.is_file():
        raise ModelError(f"{folder}: not a visiontune run or model folder ({RunDir.META} is missing)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    return ModelMeta.from_dict(data, str(path))


def load_bundle(folder: Path) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the architecture from model.json and load model.safetensors into it (eval mode, CPU)."""
    import timm
    from safetensors.torch import load_file

    from visiontune.models.weights import create_architecture

    folder = Path(folder)
    meta = read_meta(folder)
    weights = RunDir(folder).weights
    if not weights.is_file():
        raise ModelError(f"{folder}: {RunDir.WEIGHTS} is missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ModelError(f"{weights}: damaged or not a safetensors file ({str(exc)[:200]})") from None
    if not timm.is_model(meta.timm_name):
        raise ModelError(f"{RunDir(folder).meta}: architecture {meta.timm_name!r} is unknown to this timm "
                         f"({timm.__version__}); the model was made with timm {meta.versions.get('timm', '?')}")
    model = create_architecture(meta.timm_name, meta.num_classes, meta.dropout, meta.img_size)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not match {meta.timm_name} with {meta.num_classes} classes "
                         f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval(), meta


def update_meta(folder: Path, **extra) -> ModelMeta:
    """Add or replace top-level keys of model.json (calibration, uncertainty threshold, …), atomically.
    The weights are untouched, so every later consumer sees the new keys without retraining."""
    meta = read_meta(folder)
    meta.extra.update(extra)
    write_meta(folder, meta)
    return meta
