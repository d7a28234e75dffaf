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

from visiontune.config import HEADS, TASKS
from visiontune.data.transforms import INTERPOLATIONS, PREPROCESS_VERSIONS, Preprocess
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
    head: str = "linear"  # "attention": the backbone's pool is a `SpatialAttentionPool` (models/attention.py)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def task(self) -> str:
        """"multiclass" (softmax, one label an image) or "multilabel" (a sigmoid per label, a set of labels)."""
        return self.extra.get("task", "multiclass")

    @property
    def thresholds(self) -> list[float]:
        """Multi-label: the probability each label must reach to be predicted, in label order."""
        stored = (self.extra.get("multilabel") or {}).get("thresholds") or {}
        return [float(stored.get(name, 0.5)) for name in self.labels]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": {"backbone": self.backbone, "timm_name": self.timm_name,
                             "num_classes": self.num_classes, "dropout": self.dropout,
                             **({"img_size": self.img_size} if self.img_size else {}),
                             **({"head": self.head} if self.head != "linear" else {})},
            "id2label": {str(i): name for i, name in enumerate(self.labels)},
            "preprocess": self.preprocess.to_dict(),
            "versions": self.versions,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ModelMeta":
        """Read and check a model description: every field a consumer relies on has its type and range checked
        here, once, so a damaged or hand-edited model.json is one line naming the field, never a traceback
        later or a silently wrong answer."""
        check_format(data, where, FORMAT, FORMAT_VERSION, "model")
        field_check = _FieldCheck(where)
        arch = field_check.section(data, "architecture")
        labels = field_check.labels(data.get("id2label"))
        pre = field_check.section(data, "preprocess")
        preprocess = Preprocess(
            field_check.number(pre, "preprocess.input_size", 16, 4096, integer=True),
            field_check.number(pre, "preprocess.crop_pct", 0.05, 1.0),
            field_check.triple(pre, "preprocess.mean", positive=False),
            field_check.triple(pre, "preprocess.std", positive=True),
            field_check.choice(pre, "preprocess.interpolation", INTERPOLATIONS),
            field_check.number({"version": pre.get("version", 1)}, "preprocess.version", min(PREPROCESS_VERSIONS),
                               max(PREPROCESS_VERSIONS), integer=True))
        dropout = field_check.number({"dropout": arch.get("dropout", 0.0)}, "architecture.dropout", 0.0, 0.999)
        img_size = arch.get("img_size")
        if img_size is not None:
            img_size = field_check.number(arch, "architecture.img_size", 16, 4096, integer=True)
        head = field_check.choice({"head": arch.get("head", "linear")}, "architecture.head", HEADS)
        for key in ("backbone", "timm_name"):
            if not isinstance(arch.get(key), str) or not arch[key]:
                field_check.fail(f"architecture.{key}", "missing or not a name")
        if arch.get("num_classes", len(labels)) != len(labels):
            field_check.fail("architecture.num_classes", f"{arch.get('num_classes')!r} but id2label has {len(labels)}")
        known = {"format", "format_version", "architecture", "id2label", "preprocess", "versions"}
        extra = {k: v for k, v in data.items() if k not in known}
        if "calibration" in extra:
            field_check.number(field_check.section(extra, "calibration"), "calibration.temperature", 1e-3, 1e3)
        if "uncertainty" in extra:
            field_check.number(field_check.section(extra, "uncertainty"), "uncertainty.threshold", 0.0, 1.0)
        if "task" in extra:
            field_check.choice(extra, "task", TASKS)
        if "multilabel" in extra:
            thresholds = field_check.section(field_check.section(extra, "multilabel"), "thresholds")
            for name, value in thresholds.items():
                if name not in labels:
                    field_check.fail(f"multilabel.thresholds.{name}", "not one of the model's labels")
                field_check.number({name: value}, f"multilabel.thresholds.{name}", 0.0, 1.0)
        if "open_set" in extra:
            field_check.number(field_check.section(extra, "open_set"), "open_set.threshold", 0.0, 1e12)
        versions = data.get("versions", {})
        return cls(arch["backbone"], arch["timm_name"], labels, preprocess, dropout,
                   versions if isinstance(versions, dict) else {}, extra, img_size, head)


MAX_LABELS = 100_000  # beyond any classifier this tool trains; 2 million would allocate gigabytes before failing


class _FieldCheck:
    """Checks of model.json's fields, each failure one ModelError naming the file and the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, problem: str):
        raise ModelError(f"{self.where}: {name}: {problem}")

    def section(self, data: dict, name: str) -> dict:
        value = data.get(name)
        if not isinstance(value, dict):
            self.fail(name, "missing" if value is None else f"expected an object, got {type(value).__name__}")
        return value

    def number(self, data: dict, name: str, low: float, high: float, *, integer: bool = False) -> float:
        key = name.rsplit(".", 1)[-1]
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
            self.fail(name, f"{value!r} is not {'a whole number' if integer else 'a number'}")
        if not low <= value <= high:  # also refuses NaN
            self.fail(name, f"{value!r} is outside {low:g}..{high:g}")
        return int(value) if integer else float(value)

    def triple(self, data: dict, name: str, *, positive: bool) -> tuple[float, float, float]:
        value = data.get(name.rsplit(".", 1)[-1])
        if not isinstance(value, list) or len(value) != 3 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v != v for v in value):
            self.fail(name, f"{value!r}: expected three numbers (R, G, B)")
        if positive and min(value) <= 0:
            self.fail(name, f"{value!r}: every value must be above 0 (it divides)")
        return tuple(float(v) for v in value)

    def choice(self, data: dict, name: str, allowed) -> str:
        value = data.get(name.rsplit(".", 1)[-1])
        if value not in allowed:
            self.fail(name, f"{value!r}: expected one of {', '.join(sorted(allowed))}")
        return value

    def labels(self, id2label) -> list[str]:
        if not isinstance(id2label, dict) or not id2label:
            self.fail("id2label", "missing or empty: expected {\"0\": \"first class\", ...}")
        if len(id2label) > MAX_LABELS:
            self.fail("id2label", f"{len(id2label):,} labels, more than the {MAX_LABELS:,} a model here can have")
        labels = [id2label.get(str(i)) for i in range(len(id2label))]
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label:
                self.fail(f"id2label.{i}", "missing" if label is None else f"{label!r} is not a name")
        return labels


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

    from visiontune.models.multi import SEPARATOR
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
    if not all(timm.is_model(name) for name in meta.timm_name.split(SEPARATOR)):
        raise ModelError(f"{RunDir(folder).meta}: architecture {meta.timm_name!r} is unknown to this timm "
                         f"({timm.__version__}); the model was made with timm {meta.versions.get('timm', '?')}")
    model = create_architecture(meta.timm_name, meta.num_classes, meta.dropout, meta.img_size)
    if meta.head == "attention":
        from visiontune.models.attention import attach_attention

        attach_attention(model)
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
