"""Typed settings. Every default lives here and nowhere else; YAML in and out."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from visiontune.errors import ConfigError


@dataclass
class ScanConfig:
    min_side: int = 32  # images whose shorter side is below this carry too little to learn from
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold (about 9459 x 9459)
    near_duplicate_distance: int = 4  # Hamming distance between 64-bit difference hashes
    workers: int = 0  # 0: one per core


@dataclass
class SplitConfig:
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    min_per_split: int = 1  # each class must have this many images in every split it is asked for


@dataclass
class DataConfig:
    scan: ScanConfig = field(default_factory=ScanConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class AugmentConfig:
    scale: tuple = (0.25, 1.0)  # random resized crop: fraction of the image area kept
    ratio: tuple = (0.75, 1.3333)
    hflip: float = 0.5
    rotate_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    # Full fine-tune only (they need a fresh image every step, which the cached recipe does not have).
    randaugment: bool = False
    mixup: float = 0.0  # Beta(alpha, alpha); 0 turns it off
    cutmix: float = 0.0


@dataclass
class DistillConfig:
    """Knowledge distillation (`visiontune distill`): the student's loss on each cached view is
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * label loss."""

    teacher: str | None = None  # a run or ensemble directory; None: an ordinary run, no teacher
    alpha: float = 0.7  # weight of the KL term; 1 - alpha goes to the label loss (with its smoothing)
    temperature: float = 2.0  # softens both distributions, so the teacher's second choices carry signal
    teacher_backend: str = "onnx"  # engine computing the teacher's logits once per training view (CPU)
    teacher_batch: int = 64  # views cropped and sent to the teacher at a time


@dataclass
class EnsembleConfig:
    # equal | fit (minimise the validation log loss over the simplex) | "w1,w2,..." (one per member, normalised)
    weights: str = "equal"
    backend: str = "onnx"  # engine scoring the members on validation while the ensemble is built
    fit_iterations: int = 1000  # EM steps of the (convex) weight fit, before SLSQP polishes the result
    fit_tolerance: float = 1e-8  # stop when no weight moves more than this in one step
    batch_images: int = 256  # validation images decoded and scored at a time
    workers: int = 0  # decoding processes (0: one per core)
    evaluate: bool = True  # score the ensemble on its test split at the end (report.html, metrics.json)


@dataclass
class TrainConfig:
    model: str = "efficientnet_lite0"
    weights: str | None = None  # a local backbone weights file (safetensors or state dict)
    from_scratch: bool = False
    download: bool = False  # let timm fetch weights from its hub (only where one is reachable)
    seed: int = 0
    deterministic: bool = False
    full_finetune: bool = False  # train every layer on fresh augmentations (the natural choice on a GPU)
    # Cached recipe: phase 1 fits the head on pooled features of the frozen backbone; phase 2 fine-tunes
    # the top `trainable_stages` stages on activations cached at the boundary below them.
    views: int = 4  # augmented views cached per training image, besides the plain centre crop
    trainable_stages: int = 2
    head_epochs: int = 20
    head_lr: float = 1e-3
    head_batch_size: int = 64
    finetune_epochs: int = 4
    finetune_lr: float = 1e-4
    # Mixup of cached boundary activations in phase 2 (Beta alpha; 0: off): each view is seen every epoch,
    # so without it the top stages memorise the cache.
    feature_mixup: float = 0.0
    batch_size: int = 32
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    dropout: float = 0.2
    schedule: str = "cosine"  # cosine | onecycle | plateau
    warmup_fraction: float = 0.1  # of each phase's steps
    balance: str = "none"  # none | weights (class-weighted loss) | sampler (balanced batches)
    early_stopping: int = 0  # epochs without a better validation score before stopping; 0: never
    amp: str = "auto"  # auto (bf16 or fp16 on CUDA, off on CPU) | bf16 | fp16 | off
    workers: int = 0
    # Where cached views go; None: <run>/cache, deleted when the run finishes. A shared folder lets runs
    # that differ only after the frozen pass (epochs, learning rates) skip it.
    cache_dir: str | None = None
    evaluate: bool = True  # score the test split at the end: metrics, plots, report.html, MODEL_CARD.md
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # teacher: None unless `visiontune distill`


@dataclass
class EvalConfig:
    split: str = "test"  # which split of the run (or of --data) is scored
    calibrate: bool = True  # fit a temperature on validation and store it in model.json
    calibrate_min_images: int = 30  # fewer validation images than this give a temperature that is mostly noise
    ece_bins: int = 15
    most_confused: int = 10  # class pairs listed in metrics.json and the report
    top_losses: int = 24  # worst mistakes shown in the gallery
    gradcam_images: int = 6  # Grad-CAM overlays of right and of wrong predictions in the report (0: none)
    batch_images: int = 256  # decoded and scored at a time, so memory stays flat on large test sets
    backend: str = "onnx"  # ONNX Runtime scores a run 3-5x faster than PyTorch eager on a CPU, same logits
    workers: int = 0  # decoding processes (0: one per core)
    # Score each image as `predict --tta` does (centre, mirror, four corners; 6x the work). Calibration is always
    # fitted on single views: the temperature belongs to the model, whichever way it is later called.
    tta: bool = False


@dataclass
class InferenceConfig:
    # Small batches: on 2 cores ONNX Runtime was measured fastest per image well below batch 32.
    batch_size: int = 8
    top_k: int = 3
    threshold: float = 0.5  # "uncertain" below this top probability, when model.json stores no threshold
    threads: int = 0  # intra-op threads; 0: one per core
    decode_workers: int = 0  # threads decoding images while the model runs (0: one per core)


@dataclass
class ExportConfig:
    opset: int = 17
    calibration_images: int = 128  # training images INT8 calibration sees (a seeded sample of the run's train split)
    # Images whose activations ONNX Runtime holds in memory at once while calibrating (tens of MB each for Lite0).
    calibration_window: int = 128
    # Test-split images the parity check runs on (0: all). 256 was too few: on flower_photos the same INT8 model
    # agreed with fp32 on 98.8 % of a 256-image sample and 99.5 % of all 367 test images.
    parity_images: int = 1024
    fp32_atol: float = 1e-4  # ONNX fp32 logits against PyTorch
    fp32_cosine: float = 0.9999
    fp16_cosine: float = 0.999  # fp16 loses about 3 decimal digits, so its bar is lower
    int8_agreement: float = 0.99  # top-1 agreement of INT8 with fp32 on the parity images
    per_channel: bool = True
    quant_format: str = "qdq"  # qdq | qoperator
    # minmax | entropy | percentile. Percentile (99.999) clips rare outliers: on flower_photos lite0 it agreed
    # with fp32 on 99.7 % of test images against minmax's 99.5 % and entropy's 99.5 % (bench/out notes in
    # BENCHMARKS.md), at about 3x the calibration time.
    calibration_method: str = "percentile"
    seed: int = 0  # which training / test images are sampled


@dataclass
class BenchConfig:
    runs: int = 200  # timed batch-1 calls per engine, after `warmup`
    warmup: int = 20
    batch_sizes: tuple = (1, 2, 4, 8, 16, 32)
    throughput_seconds: float = 2.0  # per engine and batch size


@dataclass
class ExplainConfig:
    method: str = "gradcam"  # gradcam | gradcam++ | hirescam | eigencam | scorecam
    top_k: int = 3
    batch_size: int = 8  # images per CAM call (Score-CAM runs many masked forwards per image)
    faithfulness_steps: int = 10  # points on the deletion and insertion curves
    blur_radius: float = 10.0  # the "removed" pixels come from a Gaussian blur of this radius


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 serves the network
    port: int = 8000
    workers: int = 1  # server processes, each with its own copy of the model
    api_key: str | None = None  # when set, /v1/* needs it (X-API-Key or Authorization: Bearer)
    # A run directory is served with ONNX Runtime (several times faster than PyTorch eager on a CPU) from
    # its INT8 export when there is one ("auto"), else its fp32 export, else an fp32 export made in memory.
    backend: str = "onnx"  # onnx | torch (run directories; a model file runs on its own engine)
    precision: str = "auto"  # auto | int8 | fp32
    threads: int = 0  # model threads per worker; 0: the cores shared among the workers
    decode_threads: int = 0  # image decoding threads per worker; 0: one per core
    # Micro-batching: concurrent requests share one model call. A batch runs as soon as it is full, or
    # when no other admitted request could still join it, or after max_wait_ms.
    max_batch: int = 16
    max_wait_ms: float = 5.0
    # Images admitted at once (being received, decoded, waiting or in the model); one more is refused
    # with 503 before its body is read, so memory stays bounded by about queue_size x max_body_mb.
    queue_size: int = 64
    retry_after_s: int = 1  # the Retry-After a refused client is given
    max_body_mb: float = 10.0  # MiB; larger bodies get 413, checked from Content-Length and while reading
    max_batch_files: int = 32  # images in one /v1/predict/batch request
    body_timeout_s: float = 30.0  # a body still incomplete after this gets 408 (slow clients hold a slot)
    max_pixels: int = ScanConfig.max_pixels  # larger images are refused (422) from their header, undecoded
    top_k: int = InferenceConfig.top_k  # when a request gives no ?top_k=
    graceful_timeout_s: int = 30  # on SIGTERM, in-flight requests get this long to finish
    log_level: str = "info"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def default_workers(requested: int) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain dict, refusing unknown keys so a typo is never ignored."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, f"{where}.{name}")
        elif isinstance(hint, type) and hint is tuple and isinstance(value, list):
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


def save_yaml(obj: Any, path: Path) -> None:
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_yaml(cls: type, path: Path) -> Any:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return from_dict(cls, data, str(path))
