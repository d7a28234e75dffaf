"""`visiontune export RUN`: write RUN/export/<file>, but only once it has passed its parity check.

Reference logits come from the run's own PyTorch model on the run's test images (eval crop, the same
function training evaluated with). fp32 ONNX and TorchScript must match them to float rounding; fp16 must
keep their direction; INT8 must pick the same class as fp32 ONNX on nearly every image. Results go to
RUN/export/parity.json, pass or fail, and a failed export writes no model file.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.config import SPLITS, ExportConfig, default_workers
from visiontune.data.index import load_dataset
from visiontune.data.loader import load_for_model
from visiontune.data.transforms import normalize
from visiontune.errors import ExportError, ImageDecodeError
from visiontune.export import parity
from visiontune.export.metadata import embed_metadata
from visiontune.export.onnx import INPUT, serialize, to_onnx
from visiontune.files import atomic_write_bytes, read_json, remove_stale_temporaries, write_json
from visiontune.models import open_set
from visiontune.models.bundle import ModelMeta, load_bundle
from visiontune.models.locate import require_run
from visiontune.models.onnx_graph import open_session
from visiontune.models.open_set_head import SCOPE, WithUnknownScore, attach, split_outputs
from visiontune.models.run_dir import RunDir
from visiontune.version import __version__

_BATCH = 16


@dataclass
class ExportResult:
    path: Path
    format: str
    precision: str
    parity: dict
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        p = self.parity
        size = sum(p.stat().st_size for p in (self.path, self.path.with_suffix(".bin")) if p.is_file()) / 2**20
        line = f"wrote {self.path} ({size:.1f} MiB, {self.seconds:.0f} s); parity on {p['images']} images: "
        if self.precision == "int8":
            line += f"top-1 agreement with fp32 {p['top1_agreement']:.2%}"
            if "accuracy_change_points" in p:
                line += (f", test accuracy {p['reference_accuracy']:.2%} -> {p['accuracy']:.2%} "
                         f"({p['accuracy_change_points']:+.2f} points)")
        else:
            line += f"max |diff| {p['max_abs_diff']:.2e}, min cosine {p['min_cosine']:.6f}"
        if "unknown_agreement" in p:
            line += (f"; unknown score: same decision on {p['unknown_agreement']:.2%}, "
                     f"max |diff| {p['unknown_max_abs_diff']:.2e}")
        return line


def export_run(run: str | Path, config: ExportConfig | None = None, *, quiet: bool = True) -> ExportResult:
    """Export a run directory as `config.format` / `config.precision`; returns where the file went and its parity
    numbers. Raises ExportError (nothing written but parity.json) when the export does not match the trained model."""
    cfg = config or ExportConfig()
    format, precision, agreement = cfg.format, cfg.precision, cfg.int8_agreement
    run = require_run(run, "export")
    remove_stale_temporaries(RunDir(run).export)  # left by an export killed with -9
    if format == "tflite":
        from visiontune.export.tflite import require_converter

        require_converter(str(run))
    start = time.perf_counter()
    say = (lambda msg: None) if quiet else (lambda msg: print(f"export: {msg}", file=sys.stderr, flush=True))
    model, meta = load_bundle(run)
    model, threshold = _with_unknown_score(model, run, meta)
    metrics = RunDir(run).read_metrics()
    images = _RunImages(run, meta, cfg)
    say(f"{len(images.parity_crops)} {images.parity_split} images for the parity check")
    reference = _torch_logits(model, images.parity_batches())
    target = RunDir(run).export_file(format, precision)
    info = {"format": format, "precision": precision, "file": target.name, "source_run": str(run.resolve()),
            "versions": _versions()}
    notes: list[str] = []

    if format == "torchscript":
        from visiontune.export.torchscript import to_torchscript

        data = to_torchscript(model, meta)
        result = parity.check_close("TorchScript", parity.compare(reference, _torchscript_logits(data, images),
                                                                    images.parity_labels, threshold=threshold),
                                    atol=cfg.fp32_atol, cosine=cfg.fp32_cosine, score_atol=cfg.fp32_score_atol)
        _finish(run, target, result, lambda: atomic_write_bytes(target, data))
        _write_label_maps(run, meta)
        return ExportResult(target, format, precision, result, time.perf_counter() - start, notes)

    say("tracing to ONNX (fp32)")
    fp32 = serialize(to_onnx(model, meta.preprocess.input_size, opset=cfg.opset))
    fp32_logits = _onnx_logits(fp32, images)
    fp32_result = parity.check_close("ONNX fp32", parity.compare(reference, fp32_logits, images.parity_labels,
                                                                 threshold=threshold),
                                     atol=cfg.fp32_atol, cosine=cfg.fp32_cosine, score_atol=cfg.fp32_score_atol)
    if format == "tflite":
        return _export_tflite(run, target, fp32, fp32_result, (reference, threshold), images, cfg, meta, metrics, info,
                              start, say)
    if precision == "fp32":
        data, result = fp32, fp32_result
    else:
        if not fp32_result["passed"]:  # a broken fp32 graph would make any lower precision meaningless
            _finish(run, target, dict(fp32_result, stage="fp32 graph the lower precision starts from"))
        if precision == "fp16":
            say("tracing to ONNX (fp16)")
            data = serialize(to_onnx(model, meta.preprocess.input_size, half=True, opset=cfg.opset))
            result = parity.check_cosine("ONNX fp16", parity.compare(reference, _onnx_logits(data, images),
                                                                     images.parity_labels, threshold=threshold),
                                         cosine=cfg.fp16_cosine, score_atol=cfg.fp16_score_atol)
        else:
            from visiontune.models.quantize import quantize_int8, scoped_nodes

            calibration = images.calibration_batches()
            n_cal = sum(len(b) for b in calibration)
            say(f"calibrating INT8 on {n_cal} training images")
            data = quantize_int8(fp32, calibration, input_name=INPUT, per_channel=cfg.per_channel,
                                 quant_format=cfg.quant_format, method=cfg.calibration_method,
                                 window=cfg.calibration_window, exclude=scoped_nodes(fp32, SCOPE))
            int8_logits = _onnx_logits(data, images)
            result = parity.check_agreement("ONNX INT8", parity.compare(fp32_logits, int8_logits, images.parity_labels,
                                                                        threshold=threshold),
                                            agreement=agreement, unknown_agreement=cfg.int8_unknown_agreement)
            result["vs_pytorch"] = parity.compare(reference, int8_logits, images.parity_labels, threshold=threshold)
            if n_cal < cfg.calibration_images:  # every training image calibrated already: more cannot be had
                result["hint"] = (f"; calibration already saw all {n_cal} training images, and on {result['images']} "
                                  f"test images one disagreement is {1 / max(result['images'], 1):.1%}: "
                                  f"--int8-agreement sets the bar (accuracies of both are in parity.json)")
            info["int8"] = {"calibration_images": n_cal, "method": cfg.calibration_method,
                            "per_channel": cfg.per_channel, "quant_format": cfg.quant_format,
                            "activations": "uint8", "weights": "int8"}
    if format == "openvino":
        return _export_openvino(run, target, data, (reference, fp32_logits, threshold), images, cfg, meta, metrics,
                                info, start)
    result["reference"] = "onnx fp32" if precision == "int8" else "pytorch"
    result["split"] = images.parity_split
    _finish(run, target, result)
    info["parity"] = {k: v for k, v in result.items() if k != "vs_pytorch"}
    proto = embed_metadata(_load_proto(data), meta, metrics, info)
    _finish(run, target, result, lambda: atomic_write_bytes(target, serialize(proto)))
    _write_label_maps(run, meta)
    return ExportResult(target, format, precision, result, time.perf_counter() - start, notes)


def _export_openvino(run: Path, target: Path, onnx_data: bytes, references: tuple, images: "_RunImages",
                     cfg: ExportConfig, meta: ModelMeta, metrics: dict, info: dict, start: float) -> ExportResult:
    """The IR converted from the ONNX graph just checked, checked itself the same way, then written.
    `references`: (PyTorch's outputs, fp32 ONNX's outputs, the unknown threshold)."""
    from visiontune.export import openvino

    reference, fp32_logits, threshold = references
    model, run_ir = openvino.compile_ir(openvino.convert(onnx_data), "the OpenVINO model", default_workers(0))
    logits = _stack([run_ir(b) for b in images.parity_batches()])
    if cfg.precision == "int8":
        result = parity.check_agreement("OpenVINO INT8", parity.compare(fp32_logits, logits, images.parity_labels,
                                                                        threshold=threshold),
                                        agreement=cfg.int8_agreement, unknown_agreement=cfg.int8_unknown_agreement)
        result["vs_pytorch"] = parity.compare(reference, logits, images.parity_labels, threshold=threshold)
    else:
        result = parity.check_close("OpenVINO fp32", parity.compare(reference, logits, images.parity_labels,
                                                                    threshold=threshold),
                                    atol=cfg.fp32_atol, cosine=cfg.fp32_cosine, score_atol=cfg.fp32_score_atol)
    result.update(reference="onnx fp32" if cfg.precision == "int8" else "pytorch", split=images.parity_split)
    _finish(run, target, result)
    info["parity"] = {k: v for k, v in result.items() if k != "vs_pytorch"}
    import openvino as ov

    info["versions"]["openvino"] = ov.__version__
    _finish(run, target, result, lambda: openvino.save(model, target, meta, metrics, info))
    _write_label_maps(run, meta)
    return ExportResult(target, "openvino", cfg.precision, result, time.perf_counter() - start)


def _export_tflite(run: Path, target: Path, onnx_fp32: bytes, onnx_result: dict, references: tuple,
                   images: "_RunImages", cfg: ExportConfig, meta: ModelMeta, metrics: dict, info: dict, start: float,
                   say) -> ExportResult:
    """The flatbuffer converted from the fp32 ONNX graph just checked (fp16 too starts from it), run on LiteRT's
    interpreter and checked against PyTorch the way ONNX is, then written with its metadata.
    `references`: (PyTorch's outputs, the unknown threshold)."""
    from visiontune.export import tflite

    reference, threshold = references
    if not onnx_result["passed"]:
        _finish(run, target, dict(onnx_result, stage="fp32 ONNX graph the TFLite model is converted from"))
    say(f"converting to TFLite ({cfg.precision})")
    data = tflite.convert(onnx_fp32, cfg.precision)
    run_tflite = tflite.interpreter(data, "the TFLite model", default_workers(0))
    compared = parity.compare(reference, _stack([run_tflite(b) for b in images.parity_batches()]),
                              images.parity_labels, threshold=threshold)
    if cfg.precision == "fp16":
        result = parity.check_cosine("TFLite fp16", compared, cosine=cfg.fp16_cosine, score_atol=cfg.fp16_score_atol)
    else:
        result = parity.check_close("TFLite fp32", compared, atol=cfg.fp32_atol, cosine=cfg.fp32_cosine,
                                    score_atol=cfg.fp32_score_atol)
    result.update(reference="pytorch", split=images.parity_split)
    _finish(run, target, result)
    info.update(parity=result, input="float32 N x S x S x 3 (NHWC), normalised as in model.preprocess")
    info["versions"].update(tflite.versions())
    _finish(run, target, result, lambda: atomic_write_bytes(target, tflite.embed(data, meta, metrics, info)))
    _write_label_maps(run, meta)
    return ExportResult(target, "tflite", cfg.precision, result, time.perf_counter() - start)


def _write_label_maps(run: Path, meta: ModelMeta) -> None:
    """id2label.json / label2id.json beside the exported files, for code that reads the model's outputs without
    visiontune (output index i is the score of id2label[str(i)], the same order as model.json)."""
    write_json(RunDir(run).id2label, {str(i): label for i, label in enumerate(meta.labels)})
    write_json(RunDir(run).label2id, {label: i for i, label in enumerate(meta.labels)})


class _RunImages:
    """The run's own images, eval-cropped: a test sample for parity, a training sample for calibration."""

    def __init__(self, run: Path, meta: ModelMeta, cfg: ExportConfig):
        split_file = RunDir(run).split
        if not split_file.is_file():
            raise ExportError(f"{run}: {RunDir.SPLIT} is missing; the parity check needs the run's own images")
        self.meta, self.cfg = meta, cfg
        self.dataset = load_dataset(split_file)
        names = list(self.dataset.classes)
        # The manifest's class order is its own; map every label through the model's labels.
        self.to_model = np.array([meta.labels.index(n) if n in meta.labels else -1 for n in names])
        rng = np.random.default_rng(cfg.seed)
        self.parity_split, idx = self._pick(("test", "val", "train"), cfg.parity_images, rng)
        crops, keep = self._load(idx)
        if not len(crops):
            raise ExportError(f"{split_file}: none of the {self.parity_split} images could be read for the parity check")
        self.parity_crops = crops
        self.parity_labels = self.to_model[self.dataset.labels[keep]]
        self._rng = rng

    def _pick(self, order, limit: int, rng) -> tuple[str, np.ndarray]:
        for name in order:
            idx = np.flatnonzero(self.dataset.splits == SPLITS.index(name))
            if len(idx):
                if limit and len(idx) > limit:
                    idx = np.sort(rng.choice(idx, limit, replace=False))
                return name, idx
        raise ExportError(f"{self.dataset.source}: lists no images")

    def _load(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def one(i):
            try:
                return load_for_model(self.dataset.abspath(int(i)), self.meta.preprocess)
            except ImageDecodeError:
                return None

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(one, idx))
        keep = np.array([i for i, c in zip(idx, loaded) if c is not None], dtype=np.int64)
        crops = [c for c in loaded if c is not None]
        size = self.meta.preprocess.input_size
        return (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)), keep

    def parity_batches(self) -> list[np.ndarray]:
        return _batches(self.parity_crops, self.meta)

    def calibration_batches(self) -> list[np.ndarray]:
        _, idx = self._pick(("train", "val", "test"), self.cfg.calibration_images, self._rng)
        crops, _ = self._load(idx)
        return _batches(crops, self.meta)


def _batches(crops: np.ndarray, meta: ModelMeta) -> list[np.ndarray]:
    return [normalize(crops[i:i + _BATCH], meta.preprocess) for i in range(0, len(crops), _BATCH)]


def _with_unknown_score(model, run: Path, meta: ModelMeta):
    """(the model with the run's unknown score when it has a current one, the score's threshold or None). Without
    one, the export's copy of model.json carries no "open_set" entry either."""
    model = attach(model, run, meta)
    stored = open_set.entry(meta) if isinstance(model, WithUnknownScore) else None
    if stored is None:
        meta.extra.pop(open_set.META_KEY, None)
    return model, (float(stored["threshold"]) if stored else None)


def _stack(outputs: list) -> parity.Outputs:
    """Per-batch (logits, scores or None) -> one `parity.Outputs`."""
    logits = np.concatenate([np.asarray(o[0], np.float32) for o in outputs])
    scores = None if outputs and outputs[0][1] is None else np.concatenate([np.asarray(o[1], np.float32).reshape(-1)
                                                                             for o in outputs])
    return parity.Outputs(logits, scores)


def _torch_logits(model, batches: list[np.ndarray]) -> parity.Outputs:
    import torch

    with torch.inference_mode():
        outputs = [split_outputs(model(torch.from_numpy(b))) for b in batches]
    return _stack([(z.float().numpy(), None if s is None else s.float().numpy()) for z, s in outputs])


def _onnx_logits(data: bytes, images: _RunImages) -> parity.Outputs:
    session = open_session(data, "the exported graph")
    outputs = [session.run(None, {INPUT: b}) for b in images.parity_batches()]
    return _stack([(out[0], out[1] if len(out) > 1 else None) for out in outputs])


def _torchscript_logits(data: bytes, images: _RunImages) -> parity.Outputs:
    import io
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return _torch_logits(module, images.parity_batches())


def _load_proto(data: bytes):
    import onnx

    return onnx.load_from_string(data)


def _finish(run: Path, target: Path, result: dict, write=None) -> None:
    """Refuse to go on if the check failed, recording why in parity.json (kept per file). A passed check is
    recorded only by the call with `write`, after `write()` has put the file in place: a "passed" for a model
    never written (killed or out of disk space on the way) sent users looking for a file that was not there."""
    if result["passed"]:
        if write is None:
            return
        write()
    path = RunDir(run).parity
    record = read_json(path)
    record[target.name] = result
    write_json(path, record)
    parity.raise_if_failed(target.name, result, str(target))


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"visiontune": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
