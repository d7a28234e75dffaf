"""`visiontune export RUN`: write RUN/export/<file>, but only once it has passed its parity check.

Reference logits come from the run's own PyTorch model on the run's test images (eval crop, the same
function training evaluated with). fp32 ONNX and TorchScript must match them to float rounding; fp16 must
keep their direction; INT8 must pick the same class as fp32 ONNX on nearly every image. Results go to
RUN/export/parity.json, pass or fail, and a failed export writes no model file.

Several formats in one call share what they have in common: the model and images are loaded, the reference
computed and the fp32 ONNX graph traced and checked once (OpenVINO and TFLite are converted from it), and INT8
is calibrated once for ONNX and OpenVINO. Exporting every format one call at a time re-did all of that each time.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from visiontune.config import ExportConfig, default_workers
from visiontune.errors import ExportError
from visiontune.export import parity
from visiontune.export.metadata import embed_metadata
from visiontune.export.onnx import INPUT, serialize, to_onnx
from visiontune.export.run_images import RunImages, onnx_logits, stack, torch_logits, torchscript_logits
from visiontune.files import atomic_write_bytes, read_json, remove_stale_temporaries, write_json
from visiontune.models import open_set
from visiontune.models.bundle import ModelMeta, load_bundle
from visiontune.models.locate import require_run
from visiontune.models.open_set_head import SCOPE, WithUnknownScore, attach
from visiontune.models.run_dir import RunDir
from visiontune.version import __version__


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
            control = p.get("int8_control") or {}
            if control.get("float_layers"):
                ms = control["latency_ms_batch1"]
                line += (f"; {len(control['float_layers'])} layer(s) kept in float (batch-1 {ms['int8']:.1f} ms "
                         f"against {ms['int8_all_layers']:.1f} ms all-INT8, {ms['fp32']:.1f} ms fp32)")
        else:
            line += f"max |diff| {p['max_abs_diff']:.2e}, min cosine {p['min_cosine']:.6f}"
        if "unknown_agreement" in p:
            line += (f"; unknown score: same decision on {p['unknown_agreement']:.2%}, "
                     f"max |diff| {p['unknown_max_abs_diff']:.2e}")
        return line


class ExportResults(list):
    """The files of one call that asked for several formats or precisions, in the order written."""

    def __init__(self, results=(), notes: list[str] | None = None, seconds: float = 0.0):
        super().__init__(results)
        self.notes = notes or []
        self.seconds = seconds

    def summary(self) -> str:
        lines = [r.summary() for r in self] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines + [f"{len(self)} file(s) in {self.seconds:.0f} s"])


def export_run(run: str | Path, config: ExportConfig | None = None, *,
               quiet: bool = True) -> ExportResult | ExportResults:
    """Export a run directory as `config.format` / `config.precision` (each may name several, or `all`); returns
    where the file went and its parity numbers (an ExportResults of them for several). Raises ExportError (nothing
    written for that file but parity.json; the files checked before it stay) when an export does not match the
    trained model."""
    cfg = config or ExportConfig()
    run = require_run(run, "export")
    remove_stale_temporaries(RunDir(run).export)  # left by an export killed with -9
    jobs, skipped = cfg.jobs()
    if cfg.format.strip() == "all":  # every format this install can write; an optional one missing is a note
        missing = {f: why for f in {f for f, _ in jobs} if (why := _missing_packages(f, run))}
        jobs = [(f, p) for f, p in jobs if f not in missing]
        skipped += [f"{f} skipped: {why}" for f, why in sorted(missing.items())]
    elif any(format == "tflite" for format, _ in jobs):
        from visiontune.export.tflite import require_converter

        require_converter(str(run))
    start = time.perf_counter()
    say = (lambda msg: None) if quiet else (lambda msg: print(f"export: {msg}", file=sys.stderr, flush=True))
    shared = _Shared(run, cfg, say)
    results = ExportResults(notes=skipped)
    for k, (format, precision) in enumerate(jobs, 1):
        if len(jobs) > 1:
            say(f"{format} {precision} ({k}/{len(jobs)})")
        job_start = time.perf_counter()
        result = _export_one(shared, dataclasses.replace(cfg, format=format, precision=precision))
        result.seconds = time.perf_counter() - job_start
        results.append(result)
        if len(jobs) > 1:
            say(result.summary())
    if len(jobs) == 1 and not skipped:
        results[0].seconds = time.perf_counter() - start
        return results[0]
    results.seconds = time.perf_counter() - start
    return results


def _missing_packages(format: str, run: Path) -> str | None:
    """Why this install cannot write `format` (an optional package missing); None when it can."""
    import importlib.util

    if format == "openvino" and importlib.util.find_spec("openvino") is None:
        return "needs openvino, not installed (pip install 'visiontune[openvino]')"
    if format == "tflite":
        from visiontune.export.tflite import require_converter

        try:
            require_converter(str(run))
        except ExportError as exc:
            return str(exc).split(": ", 1)[1]
    return None


class _Shared:
    """What every format of one call starts from, each made at most once: the model (with its unknown score),
    the images, PyTorch's reference outputs, the checked fp32 ONNX graph and the INT8 graph."""

    def __init__(self, run: Path, cfg: ExportConfig, say):
        self.run, self.cfg, self.say = run, cfg, say
        self.model, self.meta = load_bundle(run)
        self.model, self.threshold = _with_unknown_score(self.model, run, self.meta)
        self.metrics = RunDir(run).read_metrics()
        self.images = RunImages(run, self.meta, cfg)
        say(f"{len(self.images.parity_crops)} {self.images.parity_split} images for the parity check")
        self.reference = torch_logits(self.model, self.images.parity_batches())

    def compare(self, outputs: parity.Outputs, against: parity.Outputs | None = None) -> dict:
        return parity.compare(self.reference if against is None else against, outputs, self.images.parity_labels,
                              threshold=self.threshold)

    @cached_property
    def fp32(self) -> tuple[bytes, parity.Outputs, dict]:
        """(the fp32 ONNX graph, its outputs, its parity with PyTorch), traced and checked once."""
        cfg = self.cfg
        self.say("tracing to ONNX (fp32)")
        data = serialize(to_onnx(self.model, self.meta.preprocess.input_size, opset=cfg.opset))
        logits = onnx_logits(data, self.images)
        result = parity.check_close("ONNX fp32", self.compare(logits), atol=cfg.fp32_atol, cosine=cfg.fp32_cosine,
                                    score_atol=cfg.fp32_score_atol)
        return data, logits, result

    @cached_property
    def calibration(self) -> list[np.ndarray]:
        """The seeded sample of training images every INT8 file of this call is calibrated on."""
        return self.images.calibration_batches()

    @cached_property
    def fp32_on_int8_grid(self) -> bytes:
        """The fp32 graph with its convolution weights on ONNX Runtime's GPTQ-rounded per-channel INT8 grid, which
        TFLite's own per-channel scales reproduce (every layer quantized: TFLite keeps none in float)."""
        from visiontune.models.int8_rounding import on_int8_grid
        from visiontune.models.quantize import Int8Calibration

        cfg, fp32 = self.cfg, self.fp32[0]
        self.say("rounding the weights by GPTQ on ONNX Runtime's per-channel grid")
        with Int8Calibration(fp32, self.calibration, input_name=INPUT, quant_format=cfg.quant_format,
                             method=cfg.calibration_method, window=cfg.calibration_window) as calibrated:
            return on_int8_grid(fp32, calibrated.build([]))

    @cached_property
    def int8(self) -> tuple[bytes, dict, dict]:
        """(the INT8 ONNX graph, its parity with fp32 ONNX, how it was calibrated and which layers stayed float),
        calibrated once; layers go back to float only when the fully quantized graph fails the gate."""
        from visiontune.export.int8_control import controlled
        from visiontune.models.quantize import Int8Calibration, scoped_nodes

        cfg = self.cfg
        fp32, fp32_logits, _ = self.fp32
        calibration = self.calibration
        n_cal = sum(len(b) for b in calibration)
        self.say(f"calibrating INT8 on {n_cal} training images")

        def gate(data: bytes) -> dict:
            int8_logits = onnx_logits(data, self.images)
            result = parity.check_agreement("ONNX INT8", self.compare(int8_logits, fp32_logits),
                                            agreement=cfg.int8_agreement, max_drop=cfg.int8_max_drop,
                                            unknown_agreement=cfg.int8_unknown_agreement)
            result["vs_pytorch"] = self.compare(int8_logits)
            return result

        def sensitivity_batches() -> list:
            images = np.concatenate(calibration)[:cfg.sensitivity_images]
            return [images[i:i + 16] for i in range(0, len(images), 16)]

        with Int8Calibration(fp32, calibration, input_name=INPUT, per_channel=cfg.per_channel,
                             quant_format=cfg.quant_format, method=cfg.calibration_method,
                             window=cfg.calibration_window, weight_rounding=cfg.weight_rounding) as calibrated:
            data, result, control = controlled(calibrated, scoped_nodes(fp32, SCOPE), gate, cfg, sensitivity_batches,
                                               self.say)
        result["int8_control"] = control
        if n_cal < cfg.calibration_images and "hint" not in result:  # every training image calibrated already
            result["hint"] = (f"; calibration already saw all {n_cal} training images, and on {result['images']} "
                              f"test images one disagreement is {1 / max(result['images'], 1):.1%}: "
                              f"--int8-agreement sets the bar (accuracies of both are in parity.json)")
        how = {"calibration_images": n_cal, "method": cfg.calibration_method, "per_channel": cfg.per_channel,
               "quant_format": cfg.quant_format, "activations": "uint8", "weights": "int8",
               "weight_rounding": cfg.weight_rounding,
               "float_layers": control["float_layers"]}
        return data, result, how


def _export_one(shared: _Shared, cfg: ExportConfig) -> ExportResult:
    """One format at one precision (`cfg.format`, `cfg.precision`), from what `shared` holds."""
    run, format, precision = shared.run, cfg.format, cfg.precision
    target = RunDir(run).export_file(format, precision)
    info = {"format": format, "precision": precision, "file": target.name, "source_run": str(run.resolve()),
            "versions": _versions()}

    if format == "torchscript":
        from visiontune.export.torchscript import to_torchscript

        data = to_torchscript(shared.model, shared.meta)
        result = parity.check_close("TorchScript", shared.compare(torchscript_logits(data, shared.images)),
                                    atol=cfg.fp32_atol, cosine=cfg.fp32_cosine, score_atol=cfg.fp32_score_atol)
        _finish(run, target, result, lambda: atomic_write_bytes(target, data))
        _write_label_maps(run, shared.meta)
        return ExportResult(target, format, precision, result, 0.0)

    fp32, fp32_logits, fp32_result = shared.fp32
    if format == "tflite":
        return _export_tflite(shared, target, cfg, info)
    if precision == "fp32":
        data, result = fp32, dict(fp32_result)
    else:
        if not fp32_result["passed"]:  # a broken fp32 graph would make any lower precision meaningless
            _finish(run, target, dict(fp32_result, stage="fp32 graph the lower precision starts from"))
        if precision == "fp16":
            shared.say("tracing to ONNX (fp16)")
            data = serialize(to_onnx(shared.model, shared.meta.preprocess.input_size, half=True, opset=cfg.opset))
            result = parity.check_cosine("ONNX fp16", shared.compare(onnx_logits(data, shared.images)),
                                         cosine=cfg.fp16_cosine, score_atol=cfg.fp16_score_atol)
        else:
            data, int8_result, info["int8"] = shared.int8
            result = dict(int8_result)
    if format == "openvino":
        return _export_openvino(shared, target, data, cfg, info)
    result["reference"] = "onnx fp32" if precision == "int8" else "pytorch"
    result["split"] = shared.images.parity_split
    _finish(run, target, result)
    info["parity"] = {k: v for k, v in result.items() if k != "vs_pytorch"}
    proto = embed_metadata(_load_proto(data), shared.meta, shared.metrics, info)
    _finish(run, target, result, lambda: atomic_write_bytes(target, serialize(proto)))
    _write_label_maps(run, shared.meta)
    return ExportResult(target, format, precision, result, 0.0)


def _export_openvino(shared: _Shared, target: Path, onnx_data: bytes, cfg: ExportConfig, info: dict) -> ExportResult:
    """The IR converted from the ONNX graph just checked, checked itself the same way, then written."""
    from visiontune.export import openvino

    _, fp32_logits, _ = shared.fp32
    model, run_ir = openvino.compile_ir(openvino.convert(onnx_data), "the OpenVINO model", default_workers(0))
    logits = stack([run_ir(b) for b in shared.images.parity_batches()])
    if cfg.precision == "int8":
        result = parity.check_agreement("OpenVINO INT8", shared.compare(logits, fp32_logits),
                                        agreement=cfg.int8_agreement, max_drop=cfg.int8_max_drop,
                                        unknown_agreement=cfg.int8_unknown_agreement)
        result["vs_pytorch"] = shared.compare(logits)
    else:
        result = parity.check_close("OpenVINO fp32", shared.compare(logits), atol=cfg.fp32_atol,
                                    cosine=cfg.fp32_cosine, score_atol=cfg.fp32_score_atol)
    result.update(reference="onnx fp32" if cfg.precision == "int8" else "pytorch", split=shared.images.parity_split)
    _finish(shared.run, target, result)
    info["parity"] = {k: v for k, v in result.items() if k != "vs_pytorch"}
    import openvino as ov

    info["versions"]["openvino"] = ov.__version__
    _finish(shared.run, target, result, lambda: openvino.save(model, target, shared.meta, shared.metrics, info))
    _write_label_maps(shared.run, shared.meta)
    return ExportResult(target, "openvino", cfg.precision, result, 0.0)


def _export_tflite(shared: _Shared, target: Path, cfg: ExportConfig, info: dict) -> ExportResult:
    """The flatbuffer converted from the fp32 ONNX graph just checked (fp16 too starts from it), run on LiteRT's
    interpreter and checked against PyTorch the way ONNX is, then written with its metadata."""
    from visiontune.export import tflite

    onnx_fp32, _, onnx_result = shared.fp32
    if not onnx_result["passed"]:
        _finish(shared.run, target, dict(onnx_result, stage="fp32 ONNX graph the TFLite model is converted from"))
    shared.say(f"converting to TFLite ({cfg.precision})")
    int8 = cfg.precision == "int8"
    gptq = int8 and cfg.weight_rounding == "gptq" and cfg.per_channel
    calibration = shared.calibration if int8 else None
    source = shared.fp32_on_int8_grid if gptq else onnx_fp32
    data = tflite.convert(source, cfg.precision, calibration)
    run_tflite = tflite.interpreter(data, "the TFLite model", default_workers(0))
    logits = stack([run_tflite(b) for b in shared.images.parity_batches()])
    compared = shared.compare(logits)
    if int8:  # judged against fp32 ONNX by the gate every INT8 export meets
        result = parity.check_agreement("TFLite INT8", shared.compare(logits, shared.fp32[1]),
                                        agreement=cfg.int8_agreement, max_drop=cfg.int8_max_drop,
                                        unknown_agreement=cfg.int8_unknown_agreement)
        result["vs_pytorch"] = compared
        if not result["passed"]:  # TFLite's full-integer model has no float fallback for single layers: say so
            result["hint"] = ("; TFLite's full-integer INT8 cannot keep single layers in float: --format onnx or "
                              "openvino --precision int8 can, or --int8-agreement lowers the bar (accuracies of "
                              "both are in parity.json)")
        info["int8"] = {"calibration_images": sum(len(b) for b in calibration), "activations": "int8",
                        "weights": "int8 per channel", "weight_rounding": "gptq" if gptq else "nearest",
                        "converter": "TensorFlow full-integer, float input and output"}
    elif cfg.precision == "fp16":
        result = parity.check_cosine("TFLite fp16", compared, cosine=cfg.fp16_cosine, score_atol=cfg.fp16_score_atol)
    else:
        result = parity.check_close("TFLite fp32", compared, atol=cfg.fp32_atol, cosine=cfg.fp32_cosine,
                                    score_atol=cfg.fp32_score_atol)
    result.update(reference="onnx fp32" if int8 else "pytorch", split=shared.images.parity_split)
    _finish(shared.run, target, result)
    info.update(parity={k: v for k, v in result.items() if k != "vs_pytorch"},
                input="float32 N x S x S x 3 (NHWC), normalised as in model.preprocess")
    info["versions"].update(tflite.versions())
    _finish(shared.run, target, result,
            lambda: atomic_write_bytes(target, tflite.embed(data, shared.meta, shared.metrics, info)))
    _write_label_maps(shared.run, shared.meta)
    return ExportResult(target, "tflite", cfg.precision, result, 0.0)


def _write_label_maps(run: Path, meta: ModelMeta) -> None:
    """id2label.json / label2id.json beside the exported files, for code that reads the model's outputs without
    visiontune (output index i is the score of id2label[str(i)], the same order as model.json)."""
    write_json(RunDir(run).id2label, {str(i): label for i, label in enumerate(meta.labels)})
    write_json(RunDir(run).label2id, {label: i for i, label in enumerate(meta.labels)})


def _with_unknown_score(model, run: Path, meta: ModelMeta):
    """(the model with the run's unknown score when it has a current one, the score's threshold or None). Without
    one, the export's copy of model.json carries no "open_set" entry either."""
    model = attach(model, run, meta)
    stored = open_set.entry(meta) if isinstance(model, WithUnknownScore) else None
    if stored is None:
        meta.extra.pop(open_set.META_KEY, None)
    return model, (float(stored["threshold"]) if stored else None)


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
