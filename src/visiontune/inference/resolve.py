"""The one model resolver: what a path is (`models.locate`), opened on the right engine.

`Classifier.load` is this module's front door; serve, bench, explain, evaluation and ensembles all come through
it, so a run directory, an ensemble, a .onnx file and a TorchScript file load the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from visiontune.config import BACKENDS, SERVE_PRECISIONS, InferenceConfig
from visiontune.data.transforms import Preprocess
from visiontune.errors import ConfigError, ModelError
from visiontune.inference.backends import (
    LoadedModel,
    OnnxBackend,
    OpenVinoBackend,
    TfliteBackend,
    TorchBackend,
    load_torchscript,
)
from visiontune.inference.ensemble import EnsembleVote
from visiontune.inference.pixel_input import custom_metadata, load_proto, with_pixel_input
from visiontune.models import open_set
from visiontune.models.bundle import ModelMeta, read_meta
from visiontune.models.locate import locate_model
from visiontune.models.manifest import read_manifest
from visiontune.models.onnx_graph import first_line
from visiontune.models.open_set import OUTPUT as SCORE
from visiontune.models.run_dir import RunDir


def open_model(path: str | Path, backend: str | None = None, *, precision: str = "fp32",
               threads: int = InferenceConfig.threads, batch_size: int = InferenceConfig.batch_size,
               spinning: bool = True, streams: int = 1) -> LoadedModel:
    """Open a run directory, an ensemble directory, a .onnx, a TorchScript, an OpenVINO (.xml) or a .tflite file.

    backend: "torch" or "onnx"; default: the file's own engine, "torch" for a run directory. A run directory on
    "onnx" runs its export (precision "fp32", "int8", or "auto": INT8 when exported, else fp32), or an fp32
    export made in memory when it has none. `spinning=False`: idle ONNX Runtime threads sleep (a server).
    `threads` serve one call; `streams` calls may run at once from as many threads (a server's model streams:
    ONNX Runtime sessions take concurrent calls as they are, OpenVINO is compiled for them)."""
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in SERVE_PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(SERVE_PRECISIONS)}")
    found = locate_model(path)
    if found.kind == "onnx":
        if backend == "torch":
            raise ConfigError(f"{found.path}: an ONNX file runs with backend 'onnx' only")
        return _onnx_file(found.path, threads, spinning)
    if found.kind == "torchscript":
        if backend == "onnx":
            raise ConfigError(f"{found.path}: a TorchScript file runs with backend 'torch' only")
        return _torchscript(found.path)
    if found.kind == "openvino":  # its own engine, whatever backend a run directory would use
        return _openvino_file(found.path, threads, streams)
    if found.kind == "tflite":
        return _tflite_file(found.path, threads)
    if found.kind == "ensemble":
        return _ensemble(found.path, backend, threads, batch_size, spinning)
    if backend == "onnx":
        return _run_on_onnx(found.path, precision, threads, spinning)
    return _run_on_torch(found.path, threads)


def _onnx_engine(model: Path | bytes, where: str, threads: int, spinning: bool,
                 spec: Preprocess | None = None) -> OnnxBackend:
    """An ONNX Runtime engine over `model` with the normalisation in its graph (`pixel_input`): by `spec`, or by
    the preprocessing in the graph's own visiontune metadata; as it is when neither is there to go by."""
    from visiontune.export.metadata import MODEL_KEY, read_metadata

    proto = load_proto(model)
    if proto is not None and spec is None and MODEL_KEY in custom_metadata(proto):
        try:
            spec = read_metadata(custom_metadata(proto), where)[0].preprocess
        except ModelError:
            spec = None  # the caller reads the metadata next and says what is wrong with it
    wrapped = with_pixel_input(proto, spec) if proto is not None and spec is not None else None
    if wrapped is None:
        return OnnxBackend(model, where, threads, spinning=spinning)
    return OnnxBackend(wrapped, where, threads, spinning=spinning, takes_pixels=True)


def _onnx_file(path: Path, threads: int, spinning: bool) -> LoadedModel:
    from visiontune.export.metadata import read_metadata

    engine = _onnx_engine(path, str(path), threads, spinning)
    meta, metrics, _ = read_metadata(engine.metadata, str(path))
    check_output_width(engine, meta, path)
    suffixes = path.suffixes
    precision = "int8" if ".int8" in suffixes else "fp16" if ".fp16" in suffixes else "fp32"
    return LoadedModel(engine, meta, path, "onnx", f"onnx {precision}", metrics)


def _openvino_file(path: Path, threads: int, streams: int) -> LoadedModel:
    from visiontune.export.openvino import read_rt_info

    engine = OpenVinoBackend(path, str(path), threads, streams)
    data, metrics, _ = read_rt_info(engine.model, str(path))
    if not data:
        raise ModelError(f"{path}: an OpenVINO model, but not a visiontune one (no model description in its rt_info); "
                         f"export it with `visiontune export RUN --format openvino`")
    meta = ModelMeta.from_dict(data, f"{path} (rt_info)")
    check_output_width(engine, meta, path)
    precision = "int8" if ".int8" in path.suffixes else "fp32"
    return LoadedModel(engine, meta, path, "openvino", f"openvino {precision}", metrics)


def _tflite_file(path: Path, threads: int) -> LoadedModel:
    from visiontune.export.tflite import read_metadata

    data, metrics, _ = read_metadata(path.read_bytes(), str(path))
    if not data:
        raise ModelError(f"{path}: a TFLite model, but not a visiontune one (no model description in its metadata); "
                         f"export it with `visiontune export RUN --format tflite`")
    meta = ModelMeta.from_dict(data, f"{path} (metadata)")
    engine = TfliteBackend(path, str(path), threads)
    check_output_width(engine, meta, path)
    precision = "int8" if ".int8" in path.suffixes else "fp16" if ".fp16" in path.suffixes else "fp32"
    return LoadedModel(engine, meta, path, "tflite", f"tflite {precision}", metrics)


def _torchscript(path: Path) -> LoadedModel:
    module, text = load_torchscript(path)
    if not text:
        raise ModelError(f"{path}: a TorchScript model, but not a visiontune one (no {RunDir.META} inside); "
                         f"export it with `visiontune export RUN --format torchscript`")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: damaged {RunDir.META} inside the TorchScript file ({exc})") from None
    meta = ModelMeta.from_dict(data, f"{path}:{RunDir.META}")
    engine = TorchBackend(module, str(path))
    check_output_width(engine, meta, path)
    return LoadedModel(engine, meta, path, "torch", "torchscript fp32")


def check_output_width(engine, meta: ModelMeta, path: Path) -> None:
    """A model file whose output is not one logit per label would give confident answers with the wrong labels:
    one blank image through it, checked before it is used."""
    size = meta.preprocess.input_size
    try:
        pixels = getattr(engine, "takes_pixels", False)
        blank = np.zeros((1, size, size, 3), np.uint8) if pixels else np.zeros((1, 3, size, size), np.float32)
        out = np.asarray(engine(blank))
    except Exception as exc:
        raise ModelError(f"{path}: does not run on a 1 x 3 x {size} x {size} input ({first_line(exc)[:160]})") from None
    if out.shape != (1, meta.num_classes):
        raise ModelError(f"{path}: outputs shape {tuple(out.shape)} for one image, but its description has "
                         f"{meta.num_classes} labels (expected (1, {meta.num_classes}))")


def exported_onnx(run: Path, precision: str) -> Path | None:
    """The exported ONNX file a run directory runs from at `precision` (None: there is none to use)."""
    order = ["int8", "fp32"] if precision == "auto" else [precision]
    for name in order:
        file = RunDir(run).export_file("onnx", name)
        if file.is_file():
            return file
    if precision == "int8":
        raise ConfigError(f"{run}: no {file.relative_to(run)}; make it with `visiontune export {run} --precision int8`")
    return None


def _run_on_onnx(run: Path, precision: str, threads: int, spinning: bool) -> LoadedModel:
    meta = read_meta(run)  # the run's model.json is newer than any export's copy (calibration is added later)
    file = exported_onnx(run, precision)
    if file is not None:
        from visiontune.export.metadata import read_metadata

        engine = _onnx_engine(file, str(file), threads, spinning, meta.preprocess)
        name = "onnx int8" if file == RunDir(run).export_file("onnx", "int8") else "onnx fp32"
        # ... but the unknown score is inside the exported graph: its threshold must be the one of that fit.
        meta = open_set.for_graph(meta, read_metadata(engine.metadata, str(file))[0], SCORE in engine.outputs)
    else:
        from visiontune.export.onnx import serialize, to_onnx
        from visiontune.models.bundle import load_bundle
        from visiontune.models.open_set_head import attach

        model, meta = load_bundle(run)
        engine = _onnx_engine(serialize(to_onnx(attach(model, run, meta), meta.preprocess.input_size)),
                              f"{run} (in memory)", threads, spinning, meta.preprocess)
        name = "onnx fp32"
    return LoadedModel(engine, meta, run, "onnx", name, RunDir(run).read_metrics())


def _run_on_torch(run: Path, threads: int) -> LoadedModel:
    from visiontune.models.bundle import load_bundle
    from visiontune.models.open_set_head import attach

    model, meta = load_bundle(run)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    return LoadedModel(TorchBackend(attach(model, run, meta), str(run)), meta, run, "torch", "pytorch fp32",
                       RunDir(run).read_metrics())


def _ensemble(folder: Path, backend: str | None, threads: int, batch_size: int, spinning: bool) -> LoadedModel:
    """Every member on `backend` (default: torch, as for a run), at fp32."""
    _, entries = read_manifest(folder)
    meta = read_meta(folder)
    where = str(RunDir(folder).ensemble)
    members = []
    for entry in entries:
        if not entry.path.is_dir():
            raise ModelError(f"{where}: member {entry.stored} is not there (looked in {entry.path}); "
                             f"{RunDir.ENSEMBLE} keeps member paths relative to the ensemble, so move them together")
        members.append(open_model(entry.path, backend, threads=threads, batch_size=batch_size, spinning=spinning))
    vote = EnsembleVote(members, [e.weight for e in entries], meta.labels, meta.preprocess, where, batch_size)
    name = f"ensemble of {len(members)} ({members[0].name})"
    return LoadedModel(vote, meta, folder, members[0].backend, name, RunDir(folder).read_metrics())
