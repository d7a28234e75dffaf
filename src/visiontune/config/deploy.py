"""The settings of what comes after training: evaluate, predict, export, bench, explain, serve."""

from __future__ import annotations

from dataclasses import dataclass

from visiontune.config.choices import (
    BACKENDS,
    CALIBRATION_METHODS,
    EXPLAIN_METHODS,
    EXPORT_FORMATS,
    EXPORT_PRECISIONS,
    FRACTION,
    LOG_LEVELS,
    QUANT_FORMATS,
    SERVE_PRECISIONS,
    SHARD_FORMATS,
    SPLITS,
    WEIGHT_ROUNDINGS,
)
from visiontune.config.train import ScanConfig
from visiontune.settings import SettingError, Settings, setting


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
    # Each point costs one more pass of the network (the ONNX export gives logits only) and ~2 kB of page; t-SNE grows
    # faster than linearly, so a sample keeps a large test set's map to seconds.
    map_points: int = setting(1000, "images on the report's embedding map (a stratified, seeded sample of those "
                                    "scored; 0: no map)", low=0)
    batch_images: int = setting(256, "images decoded and scored at a time, so memory stays flat", low=1)
    # ONNX Runtime scores a run 3-5x faster than PyTorch eager on a CPU, with the same logits.
    backend: str = setting("onnx", "engine that scores the images", choices=BACKENDS)
    workers: int = setting(0, "decoding processes (0: one per core)", low=0)
    # Calibration is always fitted on single views: the temperature belongs to the model, however it is called.
    tta: bool = setting(False, "score as `predict --tta` does: centre crop, its mirror and four corner crops "
                               "averaged (6x the work)")
    open_set: bool = setting(True, "fit the unknown score (cosine distance to the nearest training image in the "
                                   "model's feature space) on the train split, choose its threshold on validation, "
                                   "and store both with the model")
    # 50, 100, 200, 400 a class gave AUROC 0.78, 0.79, 0.83, 0.84 on that benchmark; each image is one forward pass.
    open_set_images: int = setting(200, "training images per class the unknown score compares with (a seeded sample: "
                                        "their features take one pass of the model)", low=1)
    # 0: at least 16, and at least one a class (`models.open_set.auto_dims`, measured on both benchmark datasets).
    open_set_dims: int = setting(0, "principal components of the features the distance is measured in (0: as many "
                                    "as the model has classes, at least 16)", low=0)
    open_set_accept: float = setting(0.95, "share of validation images the unknown threshold accepts (when no "
                                           "--negatives are given)", low=0.5, high=1.0)
    negatives: str | None = setting(None, "a folder of images of none of the model's classes: the unknown threshold "
                                          "is then the one that best separates validation images from them")

    def check(self) -> None:
        if self.negatives is not None and not self.open_set:
            raise SettingError("negatives", "choose the unknown threshold, which --no-open-set turns off")


@dataclass(frozen=True)
class InferenceConfig(Settings):
    # Small batches: on 2 cores ONNX Runtime was measured fastest per image well below batch 32.
    batch_size: int = setting(8, "images per model call", low=1)
    top_k: int = setting(3, "labels per image", low=1)
    threshold: float = setting(0.5, "'uncertain' below this top probability, when model.json stores none",
                               cli=False, **FRACTION)
    threads: int = setting(0, "model threads (0: one per core; with --ray, per model copy, 0: 2)", low=0)
    decode_workers: int = setting(0, "threads decoding images while the model runs (0: one per core)", low=0)
    backend: str | None = setting(None, "engine (default: onnx for a .onnx file, torch for a run directory)",
                                  choices=BACKENDS)
    tta: bool = setting(False, "average the centre crop, its mirror and four corner crops")
    # A shard is what a rerun skips once written: small enough that a kill loses little, large enough that a
    # million images make a thousand files, not a million.
    shard_images: int = setting(1000, "images per output shard (--shards)", low=1)
    shard_format: str = setting("parquet", "file format of the shards (parquet needs pyarrow: pip install "
                                           "'visiontune[ray]')", choices=SHARD_FORMATS)
    ray_actors: int = setting(0, "model copies on the Ray cluster (--ray; 0: the cluster's CPUs / --threads)", low=0)


@dataclass(frozen=True)
class ExportConfig(Settings):
    # Lists, so one call writes several files from one traced graph (all of them one call at a time took 8.4 min).
    format: str = setting("onnx", f"file format: {' | '.join(EXPORT_FORMATS)}, several comma-separated, or all")
    precision: str = setting("fp32", f"{' | '.join(EXPORT_PRECISIONS)}, several comma-separated, or all; int8: "
                                     f"static quantization calibrated on the run's training images")
    opset: int = setting(17, "ONNX opset", low=7)
    calibration_images: int = setting(128, "training images INT8 calibration sees (a seeded sample)", low=1)
    # Tens of MB each for Lite0.
    calibration_window: int = setting(128, "images whose activations are held in memory at once while calibrating",
                                      low=1)
    # 256 was too few: on flower_photos the same INT8 model agreed with fp32 on 98.8 % of a 256-image sample and
    # 99.5 % of all 367 test images.
    parity_images: int = setting(1024, "test images the parity check runs on (0: all)", low=0)
    fp32_atol: float = setting(1e-4, "largest |difference| of ONNX fp32 logits from PyTorch's", above=0.0)
    fp32_cosine: float = setting(0.9999, "least cosine similarity of fp32 logits to PyTorch's", **FRACTION)
    fp16_cosine: float = setting(0.999, "least cosine similarity of fp16 logits (it keeps about 3 decimal digits)",
                                 **FRACTION)
    # The unknown score (a cosine distance, 0 to 2) on flower_photos' 367 test images: fp32 ONNX, TorchScript and
    # OpenVINO within 8.4e-7 of PyTorch's; fp16 within 2.9e-3 (fp16 features, the distance in float32).
    fp32_score_atol: float = setting(1e-4, "largest |difference| of an fp32 export's unknown score from PyTorch's",
                                     above=0.0)
    fp16_score_atol: float = setting(0.01, "largest |difference| of an fp16 export's unknown score from PyTorch's",
                                     above=0.0)
    int8_agreement: float = setting(0.995, "INT8 must pick fp32's top-1 class on at least this fraction of test "
                                           "images", **FRACTION)
    int8_max_drop: float = setting(0.3, "INT8's test accuracy may be at most this many points below fp32's",
                                   low=0.0)
    # INT8 moves the unknown score by up to 0.07 (flower_photos, threshold 0.26): with every layer quantized, the
    # same decision on 98.6-99.2 % of the 367 test images; the layers kept in float bring it within this bound.
    int8_unknown_agreement: float = setting(0.99, "INT8 must make fp32's unknown decision on at least this fraction "
                                                  "of test images", **FRACTION)
    # NNCF's accuracy control, on ONNX Runtime's graph: the layers adding the most error against fp32 go back to
    # float, as few as pass the gate (export/int8_control.py).
    int8_max_float: int = setting(16, "most layers INT8 keeps in float, the most sensitive first, to pass its gate "
                                      "(0: quantize all, and the gate decides)", low=0)
    # A layer kept in float costs far more than its own fp32 time (the INT8 kernels around it lose their fused
    # integer path): on Lite0 about 1.2 ms each at batch 1 against 2.5 ms for the whole all-INT8 graph.
    int8_min_speedup: float = setting(1.5, "the search keeps layers in float only while INT8 stays at least this many "
                                           "times faster than fp32 at batch 1 (0: no limit)", low=0.0)
    int8_float: str = setting("", "ONNX node names always kept in float, comma-separated (parity.json lists the "
                                  "most sensitive ones)")
    sensitivity_images: int = setting(16, "calibration images the per-layer INT8 error is measured on", low=1)
    per_channel: bool = setting(True, "INT8 weights quantized per output channel")
    quant_format: str = setting("qdq", "INT8 graph form", choices=QUANT_FORMATS)
    # Percentile (99.999) clips rare outliers: on flower_photos lite0 it agreed with fp32 on 99.7 % of test images
    # against minmax's 99.5 % and entropy's 99.5 %, at about 3x the calibration time.
    calibration_method: str = setting("percentile", "INT8 calibration", choices=CALIBRATION_METHODS)
    # Measured in BENCHMARKS.md ("INT8 weights rounded by GPTQ"): nearest rounding was most of the INT8 error.
    weight_rounding: str = setting("gptq", "INT8 weights rounded to what each layer's output needs on the "
                                           "calibration images (gptq; qdq graphs) or to the nearest integer",
                                   choices=WEIGHT_ROUNDINGS)
    seed: int = setting(0, "which training / test images are sampled", low=0)

    def check(self) -> None:
        jobs, _ = self.jobs()
        if not jobs:
            raise SettingError("precision", f"no format asked for ({self.format}) comes in {self.precision}")

    def jobs(self) -> tuple[list[tuple[str, str]], list[str]]:
        """([(format, precision), ...] to write, in order; why any other pair asked for is left out). One pair
        asked for that cannot be made is an error; among several, it is skipped with a note."""
        formats = _listed("format", self.format, EXPORT_FORMATS)
        precisions = _listed("precision", self.precision, EXPORT_PRECISIONS)
        pairs = [(f, p) for f in formats for p in precisions]
        if len(pairs) == 1:
            problem = _unsupported(*pairs[0])
            if problem:
                raise SettingError("precision", problem)
        kept = [pair for pair in pairs if not _unsupported(*pair)]
        skipped = [f"{f} {p} skipped: {_unsupported(f, p).split(' (')[0].split(';')[0]}" for f, p in pairs
                   if _unsupported(f, p)]
        return kept, skipped


def _listed(name: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """The items of a comma-separated setting (`all`: every allowed one), each checked, in the allowed order."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    if items == ["all"]:
        return list(allowed)
    wrong = [x for x in items if x not in allowed]
    if wrong or not items:
        raise SettingError(name, f"{value!r} is not one of {', '.join(allowed)} (or several, comma-separated, or all)")
    return [x for x in allowed if x in items]


def _unsupported(format: str, precision: str) -> str | None:
    """Why `format` cannot be written in `precision`; None when it can."""
    if format == "torchscript" and precision != "fp32":
        return f"TorchScript export is fp32 only (asked for {precision}); use --format onnx for {precision}"
    if format == "openvino" and precision == "fp16":
        return ("OpenVINO export is fp32 or int8 (OpenVINO picks bf16 or fp16 itself where the hardware has them); "
                "use --format onnx for fp16")
    return None


@dataclass(frozen=True)
class BenchConfig(Settings):
    # Few and short by default, so a bench of every engine a run has ends well under a minute (it took over 5).
    runs: int = setting(100, "most timed batch-1 calls per engine (fewer once the median settles)", low=1)
    warmup: int = setting(5, "untimed calls first", low=0)
    batch_sizes: tuple = setting((1, 4, 16), "throughput batch sizes", low=1)
    throughput_seconds: float = setting(0.5, "per engine and batch size", flag="--seconds", above=0.0)
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
    # Measured on 2 cores, quiet, batches of 8 (BENCHMARKS.md "Serving, quiet"): 2 streams served 239-262 requests/s
    # at p99 91-106 ms against 255-278 at p99 86-97 ms for 1.
    streams: int = setting(1, "model calls run at once per worker, the model threads split among them (0: one per "
                              "model thread)", low=0)
    decode_threads: int = setting(0, "image decoding threads per worker (0: one per core)", low=0)
    # Micro-batching: concurrent requests share one model call. A batch runs as soon as it is full, or when no
    # other admitted request could still join it, or after max_wait_ms.
    # 8, not 16: three runs each, alternating (16 clients, OpenVINO INT8, 2 cores), 265 against 256 requests/s at a
    # p99 of 89-101 against 91-106 ms; 4 lost throughput (243). The engine is measured fastest per image at 8 too.
    max_batch: int = setting(8, "images per model call", low=1)
    max_wait_ms: float = setting(5.0, "longest a request waits for a batch to fill", low=0.0)
    # Bodies being received hold no place in the queue (a slow client must not starve the others); their memory
    # is bounded apart, in bytes, by body_budget_mb.
    queue_size: int = setting(64, "images in flight at once (decoded, waiting or in the model)", low=1)
    body_budget_mb: float = setting(640.0, "request bodies held at once, MiB over all requests (503 beyond)",
                                    above=0.0)
    # Each megapixel decoded holds 3-16 bytes (more for 16-bit and RGBA images on their way to RGB): 100 lets two
    # 50 MP photos, or hundreds of phone-sized JPEGs (decoded at their draft scale), decode at once.
    decode_budget_mp: float = setting(100.0, "megapixels being decoded at once over all requests (more wait their "
                                             "turn; a larger image decodes alone)", above=0.0)
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
    def decode_budget_pixels(self) -> int:
        return int(self.decode_budget_mp * 1_000_000)

    @property
    def body_budget_bytes(self) -> int:
        return int(self.body_budget_mb * 1024 * 1024)
