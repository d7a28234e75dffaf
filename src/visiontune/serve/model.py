"""What the server runs: the Classifier for MODEL, and the description of it that GET /v1/model returns."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from visiontune.config import ServeConfig
from visiontune.inference.classifier import Classifier
from visiontune.models.locate import locate_model
from visiontune.models.run_dir import RunDir
from visiontune.version import __version__

log = logging.getLogger("visiontune.serve")


def model_threads(cfg: ServeConfig) -> int:
    """Each worker process gets its share of the cores, so workers do not fight over them."""
    if cfg.threads > 0:
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // max(1, cfg.workers))


def model_streams(cfg: ServeConfig) -> int:
    """Model calls a worker runs at once (each on model_threads // streams threads)."""
    threads = model_threads(cfg)
    return min(cfg.streams, threads) if cfg.streams > 0 else threads


def load_model(model: str | Path, cfg: ServeConfig) -> Classifier:
    """A run directory (its OpenVINO INT8 export when there is one and OpenVINO is installed, else its ONNX
    export: see ServeConfig.precision), an ensemble, a .onnx, TorchScript or OpenVINO file, loaded and warmed up
    (ONNX Runtime plans its memory on the first call of each batch size, which should not land on the first user).
    ONNX Runtime's idle threads sleep rather than spin, leaving the cores to decoding."""
    found = locate_model(model)
    # A model file runs on its own engine; only a folder has a choice.
    backend = cfg.backend if found.is_folder else None
    openvino_int8 = RunDir(found.path).export_file("openvino", "int8") if found.kind == "run" else None
    if (openvino_int8 is not None and openvino_int8.is_file() and backend == "onnx" and cfg.precision == "auto"
            and importlib.util.find_spec("openvino") is not None):
        # Measured faster than ONNX Runtime's INT8 on this machine (BENCHMARKS.md "ORT vs OpenVINO"), same graph.
        found, backend = locate_model(openvino_int8), None
    streams = model_streams(cfg)
    clf = Classifier.load(found.path, backend, precision=cfg.precision if found.kind == "run" else "fp32",
                          threads=model_threads(cfg) // streams, batch_size=cfg.max_batch, spinning=False,
                          streams=streams)
    if str(getattr(clf.engine, "where", "")).endswith("(in memory)"):
        log.warning("%s has no ONNX export: serving fp32 exported in memory; `visiontune export %s "
                    "--precision int8` makes a faster model", found.path, found.path)
    size = clf.preprocess.input_size
    for n in sorted({1, cfg.max_batch}):
        clf.probabilities_and_scores(np.zeros((n, size, size, 3), np.uint8))
    return clf


def can_explain(clf: Classifier) -> bool:
    """Grad-CAM needs the PyTorch weights of one network: a run directory has them, an exported file or an
    ensemble (several networks) does not."""
    return clf.path is not None and locate_model(clf.path).kind == "run"


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
        intervals = evaluation.get("intervals") or {}
        out["intervals"] = {k: v for k, v in intervals.items() if k in out and isinstance(v, list) and len(v) == 2}
    for split in ("val", "test"):
        top1 = (metrics.get(split) or {}).get("top1")
        if isinstance(top1, (int, float)):
            out[f"{split}_top1"] = top1
    if isinstance(metrics.get("images"), dict):
        out["trained_on"] = {k: v for k, v in metrics["images"].items() if isinstance(v, int)}
    return out


def describe(clf: Classifier) -> dict:
    import onnxruntime

    meta = clf.meta
    return {
        "labels": clf.labels,
        "task": clf.task,
        **({"thresholds": dict(zip(clf.labels, clf.thresholds.tolist()))} if clf.task == "multilabel" else {}),
        "backbone": meta.backbone,
        "engine": clf.engine_name,
        "preprocess": {**clf.preprocess.to_dict(), "resize_size": clf.preprocess.resize_size},
        "temperature": clf.temperature,
        "uncertain_below": clf.threshold,
        "unknown_above": clf.unknown_threshold,  # null: the model has no unknown score
        "metrics": headline_metrics(clf.metrics),
        "explain": can_explain(clf),
        "versions": {"visiontune": __version__, "onnxruntime": onnxruntime.__version__,
                     "trained_with": dict(meta.versions)},
    }

