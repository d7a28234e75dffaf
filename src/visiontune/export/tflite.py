"""ONNX -> TFLite (LiteRT) flatbuffer, the description it carries, and the LiteRT interpreter that runs it.

The converter was chosen by measurement (BENCHMARKS.md, "TFLite export: the converter"): onnx2tf rebuilds the
exporter's own checked fp32 ONNX graph as a Keras model in memory, and TensorFlow's TFLite converter writes the
flatbuffer from it (fp32, or fp16 weights). litert-torch, which converts from PyTorch directly, cannot be installed
beside our pins: every litert-converter release pins xdsl 0.28.0, which needs typing-extensions < 4.13, and
pydantic 2.14.3 needs >= 4.16.

The graph takes NHWC input (TFLite's own layout, what a phone's camera pipeline hands over) with a free batch
dimension; `interpreter` transposes our NCHW batches and resizes the input to each batch it is given.

The model description travels in the flatbuffer's metadata, under the keys the ONNX export uses (model.json,
metrics, export record, each as JSON), beside the standard `TFLITE_METADATA` (labels, normalisation) that other
LiteRT tools read (see `tflite_metadata`), so the .tflite alone classifies an image.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from visiontune.errors import ExportError, ModelError
from visiontune.export import tflite_metadata
from visiontune.export.metadata import EXPORT_KEY, INPUT, METRICS_KEY, MODEL_KEY
from visiontune.models.bundle import ModelMeta
from visiontune.models.onnx_graph import first_line
from visiontune.version import __version__

INSTALL = "pip install 'visiontune[tflite]'"
_CONVERTER = ("tensorflow", "onnx2tf", "tf_keras", "onnx_graphsurgeon", "sng4onnx")
_KEYS = (MODEL_KEY, METRICS_KEY, EXPORT_KEY)


def require_converter(where: str) -> None:
    """Fail before any work when the converter is not installed."""
    missing = [name for name in (*_CONVERTER, "ai_edge_litert") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"{where}: TFLite export needs {', '.join(missing)}, not installed ({INSTALL})")


def convert(onnx_bytes: bytes, precision: str, calibration: list[np.ndarray] | None = None) -> bytes:
    """The TFLite flatbuffer of a serialised fp32 ONNX graph: fp32, "fp16" (weights stored as float16 and
    widened when the interpreter loads them, TFLite's float16 quantization) or "int8" (TFLite's full-integer
    quantization: int8 weights per channel, int8 activations whose ranges come from `calibration`, normalised
    N x 3 x S x S batches; float input and output). Built-in TFLite operators only, so the plain LiteRT
    interpreter runs it (no TensorFlow ops inside)."""
    import onnx

    with _native_notes_hidden():
        import onnx2tf
        import tensorflow as tf

    try:
        with tempfile.TemporaryDirectory() as tmp:  # onnx2tf insists on a folder, which it leaves empty here
            keras_model = onnx2tf.convert(onnx_graph=onnx.load_from_string(onnx_bytes), output_folder_path=tmp,
                                          non_verbose=True, not_use_onnxsim=True, disable_model_save=True)
    except (Exception, SystemExit) as exc:  # onnx2tf calls sys.exit on graphs it cannot take
        raise ExportError(f"onnx2tf could not convert the ONNX graph ({first_line(exc)[:200]})") from None
    forward = tf.function(lambda x: keras_model(x),
                          input_signature=[tf.TensorSpec(keras_model.inputs[0].shape, tf.float32, INPUT)])
    # The variables ride on a bare tf.Module: handing the converter the Keras model instead makes it serialise
    # every layer's Python config first: nearly all of the 35-40 s a Lite0 conversion took (now 2-3 s).
    holder = tf.Module()
    holder.forward, holder.weights = forward, list(keras_model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        channels_last = [np.ascontiguousarray(b.transpose(0, 2, 3, 1)) for b in calibration or []]
        if not channels_last:
            raise ExportError("TFLite INT8 needs calibration images; none were given")
        converter.representative_dataset = lambda: ([b[i:i + 1]] for b in channels_last for i in range(len(b)))
    try:
        return bytes(converter.convert())
    except Exception as exc:
        raise ExportError(f"TensorFlow's TFLite converter failed ({first_line(exc)[:200]})") from None


def embed(data: bytes, meta: ModelMeta, metrics: dict, info: dict) -> bytes:
    """`data` with the visiontune metadata entries (replaced if present), the standard TFLITE_METADATA, and the
    label file appended as a stored zip."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    values = {MODEL_KEY: json.dumps(meta.to_dict()), METRICS_KEY: json.dumps(metrics or {}),
              EXPORT_KEY: json.dumps(info)}
    entries = {name: text.encode() for name, text in values.items()}
    entries[tflite_metadata.NAME] = tflite_metadata.model_metadata(meta, f"visiontune {__version__}")
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) not in entries]
    model.buffers = model.buffers or []
    for name, payload in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(payload, dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        model.metadata.append(entry)
    packed = flatbuffer_utils.convert_object_to_bytearray(model)
    return bytes(packed) + tflite_metadata.labels_zip(meta.labels)


def read_metadata(data: bytes, where: str) -> tuple[dict, dict, dict]:
    """(model.json, metrics, export record) from a .tflite's metadata; ({}, {}, {}) parts for a model made
    elsewhere. Reads the flatbuffer in place (no unpacking of the weights)."""
    schema = _litert(where).schema_py_generated
    if not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ModelError(f"{where}: not a TFLite model (no TFL3 file identifier)")
    try:
        model = schema.Model.GetRootAs(data, 0)
        found = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            name = _name(entry.Name())
            if name in _KEYS:
                found[name] = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode()
    except Exception as exc:  # a truncated or foreign file: flatbuffers reads past its end
        raise ModelError(f"{where}: not a readable TFLite model ({first_line(exc)[:160]})") from None
    try:
        return tuple(json.loads(found.get(key) or "{}") for key in _KEYS)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{where}: damaged visiontune metadata in the TFLite model ({exc})") from None


def interpreter(model: str | Path | bytes, where: str, threads: int):
    """batch -> (logits, unknown scores or None) for a .tflite path or flatbuffer, on LiteRT's CPU interpreter
    (XNNPACK) with `threads` threads. Takes normalised N x 3 x S x S float32 like every engine here; the input is
    resized to each new batch size. One interpreter is not safe to call from two threads at once, so calls take
    turns."""
    Interpreter = _litert(where).interpreter.Interpreter
    try:
        with _native_notes_hidden():
            if isinstance(model, bytes):
                engine = Interpreter(model_content=model, num_threads=threads)
            else:
                engine = Interpreter(model_path=str(model), num_threads=threads)
            engine.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{where}: not a readable TFLite model ({first_line(exc)[:200]})") from None
    inputs, outputs = engine.get_input_details(), engine.get_output_details()
    # The converter keeps neither the outputs' names nor their order; their ranks tell them apart: logits are
    # N x C, the unknown score (a model that has one) N.
    by_rank = {len(o["shape"]): o["index"] for o in outputs}
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or len(outputs) > 2 or 2 not in by_rank \
            or (len(outputs) == 2 and 1 not in by_rank):
        raise ModelError(f"{where}: expected one image input, N x C logits and perhaps N unknown scores, found "
                         f"inputs {[list(i['shape']) for i in inputs]} and outputs {[list(o['shape']) for o in outputs]}")
    source, target, score = inputs[0]["index"], by_rank[2], by_rank.get(1)
    channels_last = int(inputs[0]["shape"][3]) == 3 and int(inputs[0]["shape"][1]) != 3
    lock = threading.Lock()
    shape = [tuple(inputs[0]["shape"])]

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.ascontiguousarray(batch.transpose(0, 2, 3, 1) if channels_last else batch, dtype=np.float32)
        with lock:
            if x.shape != shape[0]:
                engine.resize_tensor_input(source, x.shape)
                engine.allocate_tensors()
                shape[0] = x.shape
            engine.set_tensor(source, x)
            engine.invoke()
            logits = engine.get_tensor(target).astype(np.float32)  # copies: the next call reuses the buffers
            return logits, (None if score is None else engine.get_tensor(score).astype(np.float32))

    return run


def versions() -> dict:
    """The converter's and the interpreter's versions, for the export record."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tensorflow", "onnx2tf", "ai-edge-litert"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # tensorflow-cpu and friends install under their own names
            pass
    return out


@contextmanager
def _native_notes_hidden():
    """File descriptor 2 pointed at /dev/null for the duration. TensorFlow's start-up (oneDNN, CUDA drivers) and
    LiteRT's first interpreter (XNNPACK) write notes there from C++ that no setting turns off in these versions
    (TF_CPP_MIN_LOG_LEVEL does not reach them); they would be the only lines a `predict` printed to stderr.
    Python errors still propagate; this is held only around an import or an interpreter's creation."""
    sys.stderr.flush()
    saved, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


def _litert(where: str):
    try:
        import ai_edge_litert.interpreter
        import ai_edge_litert.schema_py_generated
    except ImportError:
        raise ModelError(f"{where}: a TFLite model, and the LiteRT interpreter is not installed ({INSTALL})") from None
    return ai_edge_litert


def _name(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw or "")
