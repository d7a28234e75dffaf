"""The run directory: every file a run (or an ensemble, or an evaluation folder) holds, named here and only here
(and, beside it, the few files of a `doctor` folder).

`visiontune train` writes a run directory and everything downstream reads only it, so its layout is the
contract between the stages. Code asks a `RunDir` for a path (`RunDir(run).metrics`); no other module spells
a run file's name.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml

from visiontune.config import TrainConfig
from visiontune.errors import ConfigError
from visiontune.files import atomic_write_bytes, atomic_write_text, read_json, write_json
from visiontune.settings import from_dict, to_dict

HISTORY_COLUMNS = ["phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
# (format, precision) -> the file `visiontune export` writes under export/
EXPORT_FILES = {("onnx", "fp32"): "model.onnx", ("onnx", "fp16"): "model.fp16.onnx", ("onnx", "int8"): "model.int8.onnx",
                ("torchscript", "fp32"): "model.torchscript.pt",
                ("openvino", "fp32"): "model.openvino.xml", ("openvino", "int8"): "model.int8.openvino.xml",
                ("tflite", "fp32"): "model.tflite", ("tflite", "fp16"): "model.fp16.tflite",
                ("tflite", "int8"): "model.int8.tflite"}


class RunDir:
    """Paths of one run, ensemble or evaluation folder. Nothing is read or created until asked for."""

    CONFIG = "config.yaml"  # every setting used, and where the data was
    SPLIT = "split.csv"  # path,label,split of every image used
    META = "model.json"  # architecture, labels, preprocessing, calibration; its presence marks a finished model
    WEIGHTS = "model.safetensors"
    OPEN_SET = "open_set.safetensors"  # the unknown score's fit (its threshold is in model.json's "open_set")
    METRICS = "metrics.json"
    OUT_OF_FOLD = "out_of_fold.safetensors"  # a refit run's held-out logits and labels: what calibration is fitted on
    HISTORY = "history.csv"
    SEARCH_TRIALS = "search_trials.csv"  # a --budget search's trials: settings, out-of-fold score, seconds, state
    SEARCH_STUDY = "search_study.jsonl"  # its Optuna study (a journal), which --resume continues
    TENSORBOARD = "tensorboard"
    BENCH = "bench.json"  # written by `visiontune bench RUN`, read by `compare`
    REPORT = "report.html"
    CARD = "MODEL_CARD.md"
    CLASS_REPORT = "classification_report.csv"
    PREDICTIONS = "predictions.csv"
    PLOTS = "plots"
    EVALUATIONS = "evaluations"  # evaluate --data writes a folder of its own under here
    CHECKPOINT = "checkpoint"  # resume state while training; removed when the run finishes
    CACHE = "cache"  # cached frozen-pass views while training (unless --cache-dir says elsewhere)
    EXPORT = "export"
    PARITY = "parity.json"  # under export/: every export's parity check, pass or fail
    ID2LABEL = "id2label.json"  # under export/, beside every exported model: output index -> label
    LABEL2ID = "label2id.json"  # and label -> output index
    ENSEMBLE = "ensemble.json"  # an ensemble directory's members and weights
    LOCK = ".visiontune.lock"  # held (and holding its writer's pid) while a process trains into the run

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / self.CONFIG)
    split = property(lambda self: self.path / self.SPLIT)
    meta = property(lambda self: self.path / self.META)
    weights = property(lambda self: self.path / self.WEIGHTS)
    open_set = property(lambda self: self.path / self.OPEN_SET)
    metrics = property(lambda self: self.path / self.METRICS)
    out_of_fold = property(lambda self: self.path / self.OUT_OF_FOLD)
    history = property(lambda self: self.path / self.HISTORY)
    search_trials = property(lambda self: self.path / self.SEARCH_TRIALS)
    search_study = property(lambda self: self.path / self.SEARCH_STUDY)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)
    bench = property(lambda self: self.path / self.BENCH)
    report = property(lambda self: self.path / self.REPORT)
    card = property(lambda self: self.path / self.CARD)
    class_report = property(lambda self: self.path / self.CLASS_REPORT)
    predictions = property(lambda self: self.path / self.PREDICTIONS)
    plots = property(lambda self: self.path / self.PLOTS)
    checkpoint = property(lambda self: self.path / self.CHECKPOINT)
    cache = property(lambda self: self.path / self.CACHE)
    export = property(lambda self: self.path / self.EXPORT)
    lock = property(lambda self: self.path / self.LOCK)
    parity = property(lambda self: self.path / self.EXPORT / self.PARITY)
    id2label = property(lambda self: self.path / self.EXPORT / self.ID2LABEL)
    label2id = property(lambda self: self.path / self.EXPORT / self.LABEL2ID)
    ensemble = property(lambda self: self.path / self.ENSEMBLE)

    def export_file(self, format: str = "onnx", precision: str = "fp32") -> Path:
        return self.export / EXPORT_FILES[format, precision]

    def evaluation(self, name: str) -> Path:
        """Where `evaluate --data` writes its scoring of other data (`name`: the data and split)."""
        return self.path / self.EVALUATIONS / name

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble.is_file()

    # --- the small files -----------------------------------------------------------------------------------
    def read_metrics(self) -> dict:
        return read_json(self.metrics)

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, metrics)

    def write_out_of_fold(self, logits, labels) -> None:
        from safetensors.numpy import save

        atomic_write_bytes(self.out_of_fold, save({"logits": np.ascontiguousarray(logits, dtype=np.float32),
                                                   "labels": np.ascontiguousarray(labels, dtype=np.int64)}))

    def read_out_of_fold(self):
        """(logits, labels) of the images a refit run held out before its refit, or None for a run without (labels:
        class ids, or one 0/1 row per image for a multi-label run)."""
        if not self.out_of_fold.is_file():
            return None
        from safetensors.numpy import load

        try:
            arrays = load(self.out_of_fold.read_bytes())
            logits, labels = arrays["logits"], arrays["labels"]
        except Exception as exc:  # truncated or hand-edited: one line, as for every run file
            raise ConfigError(f"{self.out_of_fold}: unreadable ({str(exc).splitlines()[0][:120]})") from None
        if logits.ndim != 2 or labels.shape not in ((len(logits),), logits.shape):  # class ids, or multi-label rows
            raise ConfigError(f"{self.out_of_fold}: logits {logits.shape} and labels {labels.shape} do not match")
        return logits, labels

    def write_config(self, data: str, root: str | None, cfg: TrainConfig, comment: str = "") -> None:
        """Every setting used, plus where the data was, so `visiontune train --config` repeats the run; `comment`
        (a line on how settings were chosen) heads the file."""
        payload = {"data": data, "root": root, **to_dict(cfg)}
        head = f"# {comment}\n" if comment else ""
        atomic_write_text(self.config, head + yaml.safe_dump(payload, sort_keys=False))

    def read_config(self) -> tuple[str, str | None, TrainConfig]:
        """(data, root, settings) of the run."""
        if not self.config.is_file():
            raise ConfigError(f"{self.path}: no {self.CONFIG}; not a visiontune run directory")
        return read_train_config(self.config)

    def read_config_text(self) -> str:
        return self.config.read_text() if self.config.is_file() else ""

    def read_history(self) -> list[dict]:
        if not self.history.is_file():
            return []
        with open(self.history, newline="") as fh:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_train_config(path: Path) -> tuple[str | None, str | None, TrainConfig]:
    """A run's config.yaml (data, root and settings) or a bare settings file."""
    try:
        payload = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(payload).__name__}")
    data, root = payload.pop("data", None), payload.pop("root", None)
    return data, root, from_dict(TrainConfig, payload, str(path))


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


class DoctorDir:
    """The files `visiontune doctor` writes into its folder."""

    ISSUES_CSV = "issues.csv"  # one row per issue, ranked within its kind
    ISSUES_JSON = "issues.json"  # the summary, every issue and every differently labelled duplicate group
    ISSUES_HTML = "issues.html"  # the same, self-contained, with thumbnails
    FIXED_MANIFEST = "fixed_manifest.csv"  # every file of the data with the suggested labels applied

    def __init__(self, path: str | Path):
        self.path = Path(path)

    issues_csv = property(lambda self: self.path / self.ISSUES_CSV)
    issues_json = property(lambda self: self.path / self.ISSUES_JSON)
    issues_html = property(lambda self: self.path / self.ISSUES_HTML)
    fixed_manifest = property(lambda self: self.path / self.FIXED_MANIFEST)

    def files(self) -> list[Path]:
        return [self.issues_csv, self.issues_json, self.issues_html, self.fixed_manifest]
