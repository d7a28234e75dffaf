"""The allowed values settings choose from, and the defaults that depend on the machine."""

from __future__ import annotations

import os as _os  # private: `from visiontune.config.choices import *` gives the values only

BACKENDS = ("onnx", "torch")  # the engines a run directory can be scored with
SCHEDULES = ("cosine", "onecycle", "plateau")
HEADS = ("linear", "attention")  # what pools the final feature map: the backbone's average, or learned attention
TASKS = ("multiclass", "multilabel")  # one label an image (softmax), or a set of labels (a sigmoid each)
TASK_CHOICES = ("auto", *TASKS)  # auto: multilabel when the data holds label sets (a manifest's `labels` column)
BALANCE = ("none", "weights", "sampler")
AMP = ("auto", "bf16", "fp16", "off")
SPLITS = ("train", "val", "test")
EXPLAIN_METHODS = ("gradcam", "gradcam++", "hirescam", "eigencam", "scorecam")
EXPORT_FORMATS = ("onnx", "torchscript", "openvino", "tflite")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_ROUNDINGS = ("gptq", "nearest")
SERVE_PRECISIONS = ("auto", "int8", "fp32")
SHARD_FORMATS = ("parquet", "csv")  # what `predict --shards` writes (Parquet needs pyarrow: the ray extra)
LOG_LEVELS = ("debug", "info", "warning", "error")
RANKINGS = ("self_confidence", "margin")  # how `doctor` orders likely mislabelled images
API_KEY_ENV = "VISIONTUNE_API_KEY"  # where `serve` takes its API key from when none is given (kept out of `ps`)
FRACTION = {"low": 0.0, "high": 1.0}


def default_workers(requested: int) -> int:
    return requested if requested > 0 else max(1, _os.cpu_count() or 1)
