"""What the server runs: the Classifier for MODEL, and the description of it that GET /v1/model returns."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from visiontune.config import ServeConfig
from visiontune.ensemble.engine import is_ensemble
from visiontune.errors import ConfigError
from visiontune.inference.classifier import EXPORTED_ONNX, ONNX_SUFFIXES, Classifier, _read_metrics
from visiontune.models.bundle import META_FILE, WEIGHTS_FILE

# The names `visiontune export` writes (export/exporter.py FILES); not imported from there because that
# module pulls in PyTorch, which an ONNX server does not need.
EXPORTED = {"int8": EXPORTED_ONNX.with_name("model.int8.onnx"), "fp32": EXPORTED_ONNX}
PRECISIONS = ("auto", "int8", "fp32")
log = logging.getLogger("visiontune.serve")
BACKENDS = ("onnx", "torch")


def model_threads(cfg: ServeConfig) -> int:
    """Each worker process gets its share of the cores, so workers do not fight over them."""
    if cfg.threads > 0:
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // max(1, cfg.workers))


def export_file(run: Path, precision: str) -> Path | None:
    """The exported ONNX file to serve a run directory from (None: export fp32 in memory)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    order = ["int8", "fp32"] if precision == "auto" else [precision]
    for name in order:
        if (run / EXPORTED[name]).is_file():
            return run / EXPORTED[name]
    if precision == "int8":
        raise ConfigError(f"{run}: no {EXPORTED['int8']}; make it with `visiontune export {run} --precision int8`")
    return None


def _onnx_classifier(file: Path, run: Path | None, cfg: ServeConfig) -> Classifier:
    """An ONNX Runtime classifier whose idle threads sleep rather than spin, leaving the cores to decoding."""
    from visiontune.inference.backends import OnnxBackend

    engine = OnnxBackend(file, str(file), model_threads(cfg), spinning=False)
    if run is None:  # a bare .onnx file: labels and preprocessing are embedded in it
        from visiontune.export.metadata import read_metadata

        meta, metrics, _ = read_metadata(engine.metadata, str(file))
    else:  # the run's own model.json, not the export's copy: evaluation adds the calibration later
        from visiontune.models.bundle import read_meta

        meta, metrics = read_meta(run), _read_metrics(run)
    return Classifier(engine, meta, path=run or file, backend="onnx", metrics=metrics, batch_size=cfg.max_batch)


def load_model(model: str | Path, cfg: ServeConfig) -> Classifier:
    """A run directory, a .onnx or a TorchScript file, loaded and warmed up (ONNX Runtime plans its memory
    on the first call of each batch size, which should not land on the first user)."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    path = Path(model)
    if path.is_file() and path.name in (META_FILE, WEIGHTS_FILE):
        path = path.parent  # pointing at a bundle's file means the bundle, as for `predict`
    # An ensemble folder (ensemble.json) is several runs: Classifier.load knows how to serve it.
    single_run = path.is_dir() and (path / META_FILE).is_file() and not is_ensemble(path)
    engine_file = export_file(path, cfg.precision) if single_run and cfg.backend == "onnx" else None
    if engine_file is not None:
        clf = _onnx_classifier(engine_file, path, cfg)
    elif path.is_file() and path.suffix.lower() in ONNX_SUFFIXES:
        clf = _onnx_classifier(path, None, cfg)
    else:
        if single_run and cfg.backend == "onnx":
            log.warning("%s has no ONNX export: serving fp32 exported in memory; `visiontune export %s "
                        "--precision int8` makes a faster model", path, path)
        # A model file runs on its own engine; only a run directory has a choice.
        clf = Classifier.load(path, cfg.backend if path.is_dir() else None, threads=model_threads(cfg),
                              batch_size=cfg.max_batch)
    size = clf.preprocess.input_size
    for n in sorted({1, cfg.max_batch}):
        clf.probabilities(np.zeros((n, size, size, 3), np.uint8))
    return clf


def can_explain(clf: Classifier) -> bool:
    """Grad-CAM needs the PyTorch weights of one network: a run directory has them, an exported file or an
    ensemble (several networks) does not."""
    single = getattr(clf.engine, "members", None) is None
    return single and clf.path is not None and Path(clf.path).is_dir()


def engine_name(clf: Classifier) -> str:
    where = str(getattr(clf.engine, "where", ""))
    if clf.backend == "onnx":
        if where.endswith(str(EXPORTED["int8"])):
            return "onnx int8"
        return "onnx fp32"
    return clf.backend


def headline_metrics(metrics: dict) -> dict:
    """The few numbers a person reads first; the full metrics.json holds file paths, which stay private."""
    out: dict = {}
    evaluation = metrics.get("evaluation") or {}
    if evaluation:
        out["split"] = evaluation.get("split")
        out["images"] = evaluation.get("images")
        for key in ("top1", "top3", "top5", "balanced_accuracy", "ece"):
            if isinstance(evaluation.get(key), (int, float)):
                out[key] = evaluation[key]
        macro = evaluation.get("macro") or {}
        if isinstance(macro.get("f1"), (int, float)):
            out["macro_f1"] = macro["f1"]
    for split in ("val", "test"):
        top1 = (metrics.get(split) or {}).get("top1")
        if isinstance(top1, (int, float)):
            out[f"{split}_top1"] = top1
    if isinstance(metrics.get("images"), dict):
        out["trained_on"] = {k: v for k, v in metrics["images"].items() if isinstance(v, int)}
    return out


def describe(clf: Classifier) -> dict:
    import onnxruntime

    from visiontune import __version__

    meta = clf.meta
    return {
        "labels": clf.labels,
        "backbone": meta.backbone,
        "engine": engine_name(clf),
        "preprocess": {**clf.preprocess.to_dict(), "resize_size": clf.preprocess.resize_size},
        "temperature": clf.temperature,
        "uncertain_below": clf.threshold,
        "metrics": headline_metrics(clf.metrics),
        "explain": can_explain(clf),
        "versions": {"visiontune": __version__, "onnxruntime": onnxruntime.__version__,
                     "trained_with": dict(meta.versions)},
    }

