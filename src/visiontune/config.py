"""Every setting, declared once: default, help, CLI flag, allowed values. The CLI is generated from here.

Each config checks itself when made (see `settings.py`); `override(config, **changes)` is the one way to change
one, and YAML goes in and out through `from_dict` / `save_yaml`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from visiontune.settings import (
    SettingError,
    Settings,
    from_dict,
    load_yaml,
    override,
    parse_duration,
    save_yaml,
    section,
    setting,
    to_dict,
)

BACKENDS = ("onnx", "torch")  # the engines a run directory can be scored with
SCHEDULES = ("cosine", "onecycle", "plateau")
BALANCE = ("none", "weights", "sampler")
AMP = ("auto", "bf16", "fp16", "off")
SPLITS = ("train", "val", "test")
EXPLAIN_METHODS = ("gradcam", "gradcam++", "hirescam", "eigencam", "scorecam")
EXPORT_FORMATS = ("onnx", "torchscript", "openvino", "tflite")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
SERVE_PRECISIONS = ("auto", "int8", "fp32")
LOG_LEVELS = ("debug", "info", "warning", "error")
API_KEY_ENV = "VISIONTUNE_API_KEY"  # where `serve` takes its API key from when none is given (kept out of `ps`)
FRACTION = {"low": 0.0, "high": 1.0}

__all__ = ["AugmentConfig", "BenchConfig", "DataConfig", "DistillConfig", "EnsembleConfig", "EvalConfig", "ExplainConfig",
           "ExportConfig", "InferenceConfig", "ScanConfig", "ServeConfig", "SplitConfig", "TrainConfig",
           "default_workers", "from_dict", "load_yaml", "override", "save_yaml", "to_dict"]


@dataclass(frozen=True)
class ScanConfig(Settings):
    min_side: int = setting(32, "images whose shorter side is smaller carry too little to learn from", low=1)
    # Pillow's own decompression-bomb threshold (about 9459 x 9459)
    max_pixels: int = setting(89_478_485, "images with more pixels are refused as decompression bombs", low=1)
    # Scaled so its short side fits the model, a 300000 x 32 image would be 2 million pixels long: gigabytes.
    max_aspect: float = setting(20.0, "images whose long side is more than this many times their short side are "
                                      "refused from their header, undecoded", low=1.0)
    near_duplicate_distance: int = setting(4, "Hamming distance between 64-bit difference hashes that counts as a "
                                              "near duplicate", low=0, high=64)
    workers: int = setting(0, "decoding processes (0: one per core)", low=0)


@dataclass(frozen=True)
class SplitConfig(Settings):
    val: float = setting(0.1, "fraction of each class for validation", **FRACTION)
    test: float = setting(0.1, "fraction of each class for test", **FRACTION)
    seed: int = setting(0, "same seed, same split", low=0)
    min_per_split: int = setting(1, "fewest images of each class in each split asked for; 0 lets a class be absent",
                                 low=0)

    def check(self) -> None:
        if self.val + self.test >= 1.0:
            raise SettingError("val", f"val {self.val} + test {self.test} leave nothing to train on")


@dataclass(frozen=True)
class DataConfig(Settings):
    """`visiontune split`: which files are usable, and how they are divided."""

    scan: ScanConfig = section(ScanConfig)
    split: SplitConfig = section(SplitConfig)


@dataclass(frozen=True)
class AugmentConfig(Settings):
    scale: tuple = setting((0.25, 1.0), "random resized crop: range of the image area kept", low=0.0, high=1.0)
    ratio: tuple = setting((0.75, 1.3333), "random resized crop: range of aspect ratios", above=0.0)
    hflip: float = setting(0.5, "probability of a horizontal flip", **FRACTION)
    rotate_degrees: float = setting(10.0, "largest random rotation", low=0.0, high=180.0)
    brightness: float = setting(0.2, "largest random brightness change (fraction)", low=0.0)
    contrast: float = setting(0.2, "largest random contrast change (fraction)", low=0.0)
    # Full fine-tune only: they need a fresh image every step, which the cached recipe does not have.
    randaugment: bool = setting(False, "RandAugment (full fine-tune only)")
    mixup: float = setting(0.0, "mixup Beta alpha, e.g. 0.2 (full fine-tune only; 0: off)", low=0.0)
    cutmix: float = setting(0.0, "cutmix Beta alpha, e.g. 1.0 (full fine-tune only; 0: off)", low=0.0)

    def check(self) -> None:
        for name in ("scale", "ratio"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise SettingError(name, f"expected two numbers, smallest first, got {pair}")


@dataclass(frozen=True)
class DistillConfig(Settings):
    """Knowledge distillation (`visiontune distill`): the student's loss on each cached view is
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * label loss."""

    teacher: str | None = setting(None, "a run or ensemble directory to learn from (None: an ordinary run)")
    alpha: float = setting(0.7, "weight of the KL-to-teacher term; 1 - alpha weighs the label loss", **FRACTION)
    temperature: float = setting(2.0, "softens teacher and student distributions, so the teacher's second choices "
                                      "carry signal", above=0.0)
    teacher_backend: str = setting("onnx", "engine computing the teacher's logits once per training view",
                                   choices=BACKENDS)
    teacher_batch: int = setting(64, "views cropped and sent to the teacher at a time", low=1)


@dataclass(frozen=True)
class EnsembleConfig(Settings):
    weights: str = setting("equal", "equal, fit (minimum validation log loss of the soft vote), or one number per "
                                    "run: w1,w2,...")
    backend: str = setting("onnx", "engine scoring the members while the ensemble is built and evaluated",
                           choices=BACKENDS)
    fit_iterations: int = setting(1000, "EM steps of the (convex) weight fit, before SLSQP polishes it", low=1)
    fit_tolerance: float = setting(1e-8, "the fit stops when no weight moves more than this in one step", above=0.0)
    batch_images: int = setting(256, "validation images decoded and scored at a time", low=1)
    workers: int = setting(0, "decoding processes (0: one per core)", low=0)
    evaluate: bool = setting(True, "score the ensemble on its test split at the end (report.html, metrics.json)")

    def check(self) -> None:
        if self.weights in ("equal", "fit"):
            return
        try:
            numbers = [float(x) for x in self.weights.split(",") if x.strip()]
        except ValueError:
            numbers = []
        if not numbers or min(numbers) < 0 or sum(numbers) <= 0:
            raise SettingError("weights", f"{self.weights!r}: expected equal, fit, or one number per run (0 or more, "
                                          f"not all 0), e.g. 0.5,0.3,0.2")


@dataclass(frozen=True)
class TrainConfig(Settings):
    model: str = setting("efficientnet_lite0", "registry or timm name", aliases=("student",))
    weights: str | None = setting(None, "backbone weights file (timm / Hugging Face safetensors or a PyTorch state "
                                        "dict) for any timm architecture; its classifier is replaced")
    # A ViT is built for its input size (e.g. vit_small_patch14_dinov2 at 518 px): smaller is far cheaper on a CPU,
    # and its position embeddings are resampled to the new grid when the weights load.
    input_size: int = setting(0, "input size in pixels (0: the architecture's own, from timm's pretrained config)",
                              low=0)
    from_scratch: bool = setting(False, "random initialisation, no pretrained weights")
    download: bool = setting(False, "let timm download weights from its hub (only where one is reachable)")
    seed: int = setting(0, "drives the split, augmentations and initialisation", low=0, also=("split.seed",))
    deterministic: bool = setting(False, "deterministic kernels where torch has them")
    full_finetune: bool = setting(False, "train every layer on fresh augmentations (the natural choice on a GPU)")
    # A run with a budget replaces views and phase-2 epochs with its plan and clears budget in its config.yaml.
    budget: str | None = setting(None, "finish within this wall-clock time, e.g. 90s, 5m, 1h: views and phase-2 "
                                       "epochs planned from a short warm-up on this machine")
    # Cached recipe: phase 1 fits the head on pooled features of the frozen backbone; phase 2 fine-tunes the top
    # `trainable_stages` stages on activations cached at the boundary below them.
    views: int = setting(4, "augmented views cached per training image, besides the plain centre crop", low=0)
    # Random crops make objects look larger than the centre crop evaluation sees, so training a little below the
    # test size matches them (the train/test resolution discrepancy), and smaller views cost less to cache.
    train_size: int = setting(0, "side of the cached training views, in pixels (0: the model's input size); "
                                 "validation, test and the saved model keep the input size", low=0)
    trainable_stages: int = setting(2, "top backbone stages fine-tuned in phase 2", low=0)
    head_epochs: int = setting(20, "phase 1 epochs (the head on cached pooled features)", low=0)
    head_lr: float = setting(1e-3, "phase 1 learning rate", above=0.0)
    head_batch_size: int = setting(64, "phase 1 batch size", low=1)
    finetune_epochs: int = setting(4, "phase 2 / full fine-tune epochs", flag="--epochs", aliases=("epochs",), low=0)
    finetune_lr: float = setting(1e-4, "phase 2 / full fine-tune learning rate", flag="--lr", aliases=("lr",),
                                 above=0.0)
    # Each cached view is seen every epoch, so without mixup the top stages can memorise the cache.
    feature_mixup: float = setting(0.0, "phase 2: mixup of cached activations, Beta alpha (0: off)", low=0.0)
    batch_size: int = setting(32, "phase 2 / full fine-tune batch size", low=1)
    ema: float = setting(0.0, "phase 2 / full fine-tune: decay of an exponential moving average of the weights, "
                              "validated and kept instead of the raw ones (0: off; e.g. 0.999)", low=0.0, high=0.99999)
    weight_decay: float = setting(0.01, "AdamW weight decay", low=0.0)
    label_smoothing: float = setting(0.1, "cross-entropy label smoothing", low=0.0, high=0.99)
    dropout: float = setting(0.2, "dropout before the classifier", low=0.0, high=0.99)
    schedule: str = setting("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_fraction: float = setting(0.1, "of each phase's steps spent warming up", **FRACTION)
    balance: str = setting("none", "for imbalanced data: class-weighted loss or balanced batches", choices=BALANCE)
    early_stopping: int = setting(0, "stop after this many epochs without a better validation score (0: never)",
                                  low=0)
    amp: str = setting("auto", "mixed precision on CUDA (auto: bf16 or fp16 on CUDA, off on CPU)", choices=AMP)
    # A shared folder lets runs that differ only after the frozen pass (epochs, learning rates) skip it.
    cache_dir: str | None = setting(None, "keep cached views here to reuse across runs (default: inside the run, "
                                          "deleted at the end)")
    evaluate: bool = setting(True, "score the test split at the end: metrics, plots, report.html, MODEL_CARD.md")
    augment: AugmentConfig = section(AugmentConfig)
    split: SplitConfig = section(SplitConfig, "when the data has no split of its own")
    scan: ScanConfig = section(ScanConfig)
    distill: DistillConfig = section(DistillConfig, "set by `visiontune distill`; no teacher otherwise")

    def check(self) -> None:
        if self.weights and self.from_scratch:
            raise SettingError("weights", "--weights and --from-scratch contradict each other; pass one")
        if self.budget is not None:
            try:
                parse_duration(self.budget)
            except ValueError as exc:
                raise SettingError("budget", f"{self.budget!r}: {exc}; expected e.g. 90s, 5m or 1h") from None
            if self.full_finetune:
                raise SettingError("budget", "--budget plans the cached recipe; --full-finetune takes --epochs")
        if self.distill.teacher and self.full_finetune:
            raise SettingError("full_finetune", "distillation uses the cached recipe (the teacher's logits are computed "
                                                "once per cached view); --full-finetune draws fresh augmentations "
                                                "every epoch, so it cannot take a teacher")


@dataclass(frozen=True)
class EvalConfig(Settings):
    split: str = setting("test", "which split of the run (or of --data) is scored; data without splits is scored "
                                 "whole", choices=SPLITS)
    calibrate: bool = setting(True, "fit a temperature on validation and store it in model.json")
    calibrate_min_images: int = setting(30, "fewer validation images give a temperature that is mostly noise: "
                                            "not fitted", low=1)
    ece_bins: int = setting(15, "bins of the calibration error", low=1)
    most_confused: int = setting(10, "class pairs listed in metrics.json and the report", low=0)
    top_losses: int = setting(24, "worst mistakes shown in the gallery", low=0)
    gradcam_images: int = setting(6, "Grad-CAM overlays of right and of wrong predictions in the report (0: none)",
                                  low=0)
    batch_images: int = setting(256, "images decoded and scored at a time, so memory stays flat", low=1)
    # ONNX Runtime scores a run 3-5x faster than PyTorch eager on a CPU, with the same logits.
    backend: str = setting("onnx", "engine that scores the images", choices=BACKENDS)
    workers: int = setting(0, "decoding processes (0: one per core)", low=0)
    # Calibration is always fitted on single views: the temperature belongs to the model, however it is called.
    tta: bool = setting(False, "score as `predict --tta` does: centre crop, its mirror and four corner crops "
                               "averaged (6x the work)")


@dataclass(frozen=True)
class InferenceConfig(Settings):
    # Small batches: on 2 cores ONNX Runtime was measured fastest per image well below batch 32.
    batch_size: int = setting(8, "images per model call", low=1)
    top_k: int = setting(3, "labels per image", low=1)
    threshold: float = setting(0.5, "'uncertain' below this top probability, when model.json stores none",
                               cli=False, **FRACTION)
    threads: int = setting(0, "model threads (0: one per core)", low=0)
    decode_workers: int = setting(0, "threads decoding images while the model runs (0: one per core)", low=0)
    backend: str | None = setting(None, "engine (default: onnx for a .onnx file, torch for a run directory)",
                                  choices=BACKENDS)
    tta: bool = setting(False, "average the centre crop, its mirror and four corner crops")


@dataclass(frozen=True)
class ExportConfig(Settings):
    format: str = setting("onnx", "file format", choices=EXPORT_FORMATS)
    precision: str = setting("fp32", "int8: static quantization calibrated on the run's training images",
                             choices=EXPORT_PRECISIONS)
    opset: int = setting(17, "ONNX opset", low=7)
    calibration_images: int = setting(128, "training images INT8 calibration sees (a seeded sample)", low=1)
    # Tens of MB each for Lite0.
    calibration_window: int = setting(128, "images whose activations ONNX Runtime holds at once while calibrating",
                                      low=1)
    # 256 was too few: on flower_photos the same INT8 model agreed with fp32 on 98.8 % of a 256-image sample and
    # 99.5 % of all 367 test images.
    parity_images: int = setting(1024, "test images the parity check runs on (0: all)", low=0)
    fp32_atol: float = setting(1e-4, "largest |difference| of ONNX fp32 logits from PyTorch's", above=0.0)
    fp32_cosine: float = setting(0.9999, "least cosine similarity of fp32 logits to PyTorch's", **FRACTION)
    fp16_cosine: float = setting(0.999, "least cosine similarity of fp16 logits (it keeps about 3 decimal digits)",
                                 **FRACTION)
    int8_agreement: float = setting(0.99, "INT8 must pick fp32's top-1 class on at least this fraction of test "
                                          "images", **FRACTION)
    per_channel: bool = setting(True, "INT8 weights quantized per output channel")
    quant_format: str = setting("qdq", "INT8 graph form", choices=QUANT_FORMATS)
    # Percentile (99.999) clips rare outliers: on flower_photos lite0 it agreed with fp32 on 99.7 % of test images
    # against minmax's 99.5 % and entropy's 99.5 %, at about 3x the calibration time.
    calibration_method: str = setting("percentile", "INT8 calibration", choices=CALIBRATION_METHODS)
    seed: int = setting(0, "which training / test images are sampled", low=0)

    def check(self) -> None:
        if self.format == "torchscript" and self.precision != "fp32":
            raise SettingError("precision", f"TorchScript export is fp32 only (asked for {self.precision}); use "
                                            f"--format onnx for {self.precision}")
        if self.format == "openvino" and self.precision == "fp16":
            raise SettingError("precision", "OpenVINO export is fp32 or int8 (OpenVINO picks bf16 or fp16 itself "
                                            "where the hardware has them); use --format onnx for fp16")
        if self.format == "tflite" and self.precision == "int8":
            # Measured: TFLite's full-integer INT8 of the flower_photos Lite0 run picked fp32's class on 98.4 % of
            # its test images (128 calibration images; 98.1 % with 512), under the 99 % every INT8 export must meet.
            raise SettingError("precision", "TFLite export is fp32 or fp16 (TFLite's INT8 did not keep parity with "
                                            "fp32, see BENCHMARKS.md); use --format onnx or openvino for int8")


@dataclass(frozen=True)
class BenchConfig(Settings):
    runs: int = setting(200, "timed batch-1 calls per engine", low=1)
    warmup: int = setting(20, "untimed calls first", low=0)
    batch_sizes: tuple = setting((1, 2, 4, 8, 16, 32), "throughput batch sizes", low=1)
    throughput_seconds: float = setting(2.0, "per engine and batch size", flag="--seconds", above=0.0)
    threads: int = setting(0, "model threads (0: one per core)", low=0)

    def check(self) -> None:
        if not self.batch_sizes:
            raise SettingError("batch_sizes", "give at least one batch size, e.g. 1,4,16")


@dataclass(frozen=True)
class ExplainConfig(Settings):
    method: str = setting("gradcam", "how the heat map is made", choices=EXPLAIN_METHODS)
    top_k: int = setting(3, "predictions shown", low=1)
    batch_size: int = setting(8, "images per CAM call (Score-CAM runs many masked forwards per image)", low=1)
    layer: str | None = setting(None, "target layer by module name (default: the last feature map before pooling)")
    faithfulness: bool = setting(False, "also measure deletion/insertion scores (about 40 extra forward passes an "
                                        "image)")
    faithfulness_steps: int = setting(10, "points on the deletion and insertion curves", low=2)
    blur_radius: float = setting(10.0, "the 'removed' pixels come from a Gaussian blur of this radius", above=0.0)


@dataclass(frozen=True)
class ServeConfig(Settings):
    host: str = setting("127.0.0.1", "address to listen on (127.0.0.1: this machine only; 0.0.0.0: the network)")
    port: int = setting(8000, "TCP port", low=0, high=65535)
    workers: int = setting(1, "server processes, each with its own copy of the model", low=1)
    api_key: str | None = setting(None, "require this key on /v1/* (X-API-Key or Authorization: Bearer); default: "
                                        "$VISIONTUNE_API_KEY, else none")
    # A run directory is served with ONNX Runtime (several times faster than PyTorch eager on a CPU) from its INT8
    # export when there is one ("auto"), else its fp32 export, else an fp32 export made in memory.
    backend: str = setting("onnx", "engine for a run directory (a model file runs on its own)", choices=BACKENDS)
    precision: str = setting("auto", "model of a run directory: auto = export/model.int8.openvino.xml if there and "
                                     "OpenVINO is installed (measured fastest), else export/model.int8.onnx, else "
                                     "export/model.onnx, else fp32 exported in memory", choices=SERVE_PRECISIONS)
    threads: int = setting(0, "model threads per worker (0: the cores shared among the workers)", low=0)
    decode_threads: int = setting(0, "image decoding threads per worker (0: one per core)", low=0)
    # Micro-batching: concurrent requests share one model call. A batch runs as soon as it is full, or when no
    # other admitted request could still join it, or after max_wait_ms.
    max_batch: int = setting(16, "images per model call", low=1)
    max_wait_ms: float = setting(5.0, "longest a request waits for a batch to fill", low=0.0)
    # Bodies being received hold no place in the queue (a slow client must not starve the others); their memory
    # is bounded apart, in bytes, by body_budget_mb.
    queue_size: int = setting(64, "images in flight at once (decoded, waiting or in the model)", low=1)
    body_budget_mb: float = setting(640.0, "request bodies held at once, MiB over all requests (503 beyond)",
                                    above=0.0)
    retry_after_s: int = setting(1, "the Retry-After a refused client is given", low=0)
    max_body_mb: float = setting(10.0, "request body limit, MiB (413 beyond, checked while reading)", above=0.0)
    max_batch_files: int = setting(32, "images in one /v1/predict/batch request", low=1)
    body_timeout_s: float = setting(30.0, "seconds a request body may take to arrive (then 408)",
                                    flag="--body-timeout", above=0.0)
    header_timeout_s: float = setting(10.0, "seconds a client may take to send a request's headers (then the "
                                            "connection is closed)", flag="--header-timeout", above=0.0)
    max_pixels: int = setting(ScanConfig.max_pixels, "larger images are refused (422) from their header, undecoded",
                              low=1)
    top_k: int = setting(InferenceConfig.top_k, "labels per image when a request gives no ?top_k=", low=1)
    graceful_timeout_s: int = setting(30, "seconds in-flight requests get to finish on SIGTERM",
                                      flag="--graceful-timeout", low=0)
    log_level: str = setting("info", "server log level", choices=LOG_LEVELS)

    def check(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise SettingError("api_key", "is empty")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def body_budget_bytes(self) -> int:
        return int(self.body_budget_mb * 1024 * 1024)


def default_workers(requested: int) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)
