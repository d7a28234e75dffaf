"""TFLite converters compared on a trained run: conversion time, parity with PyTorch, LiteRT speed.

    # onnx2tf + TensorFlow's converter (the tflite extra), from the exporter's own fp32 ONNX graph
    .venv/bin/python bench/tflite_converters.py convert --run RUN --converter onnx2tf --precision fp32 \
        --out bench/out/tflite/o2t.fp32.tflite
    # litert-torch, straight from PyTorch: it cannot be installed beside our pins, so from a venv of its own
    PYTHONPATH=src OTHER_VENV/bin/python bench/tflite_converters.py convert --run RUN --converter litert-torch \
        --out bench/out/tflite/lt.fp32.tflite
    # the files side by side on LiteRT's interpreter, 2 threads, in one process
    .venv/bin/python bench/tflite_converters.py time bench/out/tflite/*.tflite

`convert` prints (and with --json saves) the conversion seconds and the parity of the file against the run's
PyTorch model on the run's test split (the exporter's own comparison). `--precision int8` is TensorFlow's
full-integer quantization (float input and output) calibrated on --calibration-images training images, the
experiment behind `visiontune export --format tflite` offering no INT8. `time` interleaves the files in blocks
(batch-1 latency from a tensor), then measures batch-32 throughput for files with a free batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, save_json  # noqa: E402


def convert(args) -> dict:
    from visiontune.config import ExportConfig
    from visiontune.export import parity
    from visiontune.export.run_images import RunImages, torch_logits
    from visiontune.models.bundle import load_bundle

    model, meta = load_bundle(args.run)
    images = RunImages(args.run, meta, ExportConfig(calibration_images=args.calibration_images))
    reference = torch_logits(model, images.parity_batches())
    start = time.perf_counter()
    if args.converter == "litert-torch":
        import litert_torch
        import torch

        size = meta.preprocess.input_size
        # A free batch dimension fails in litert-torch's lowering of the TF-"same" padding (a Pad of a batch of
        # unknown size), so the batch is fixed at 1.
        data = litert_torch.convert(model.eval(), (torch.zeros(1, 3, size, size),)).model_content()
    elif args.precision == "int8":
        data = _int8(args.run, images)
    else:
        from visiontune.export.onnx import serialize, to_onnx
        from visiontune.export.tflite import convert as to_tflite

        data = to_tflite(serialize(to_onnx(model, meta.preprocess.input_size)), args.precision)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    logits = np.concatenate([b for b in _run_batches(args.out, images.parity_batches())])
    result = {"converter": args.converter, "precision": args.precision, "convert_seconds": round(seconds, 1),
              "file": str(args.out), "mib": round(len(data) / 2**20, 2),
              "parity_vs_pytorch": parity.compare(reference, logits, images.parity_labels), **describe()}
    print(json.dumps(result, indent=2))
    return result


def _int8(run: Path, images) -> bytes:
    import onnx
    import onnx2tf
    import tensorflow as tf

    from visiontune.export.onnx import serialize, to_onnx
    from visiontune.models.bundle import load_bundle

    model, meta = load_bundle(run)
    with tempfile.TemporaryDirectory() as tmp:
        keras_model = onnx2tf.convert(onnx_graph=onnx.load_from_string(serialize(to_onnx(model, meta.preprocess.input_size))),
                                      output_folder_path=tmp, non_verbose=True, not_use_onnxsim=True,
                                      disable_model_save=True)
    forward = tf.function(lambda x: keras_model(x),
                          input_signature=[tf.TensorSpec(keras_model.inputs[0].shape, tf.float32, "input")])
    holder = tf.Module()
    holder.forward, holder.weights = forward, list(keras_model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], holder)
    calibration = images.calibration_batches()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: ([b[i:i + 1].transpose(0, 2, 3, 1)] for b in calibration
                                                for i in range(len(b)))
    return bytes(converter.convert())


def _interpreter(path: Path, batch: int):
    """(interpreter, input index, output index, channels_last) with the input sized for `batch` where it can be."""
    from ai_edge_litert.interpreter import Interpreter

    engine = Interpreter(model_path=str(path), num_threads=2)
    detail = engine.get_input_details()[0]
    if detail["shape_signature"][0] == -1:
        engine.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
    engine.allocate_tensors()
    return engine, detail["index"], engine.get_output_details()[0]["index"], int(detail["shape"][3]) == 3


def _run_batches(path: Path, batches: list[np.ndarray]):
    """Logits of normalised NCHW batches, one image at a time (a file with a fixed batch of 1 takes no more)."""
    engine, source, target, channels_last = _interpreter(path, 1)
    for batch in batches:
        out = []
        for x in batch:
            x = x[None].transpose(0, 2, 3, 1) if channels_last else x[None]
            engine.set_tensor(source, np.ascontiguousarray(x, dtype=np.float32))
            engine.invoke()
            out.append(engine.get_tensor(target)[0])
        yield np.stack(out)


def time_files(args) -> dict:
    rng = np.random.default_rng(0)
    single = {str(f): _interpreter(f, 1) for f in args.files}
    inputs = {}
    for name, (engine, source, _, _) in single.items():
        inputs[name] = rng.standard_normal(engine.get_input_details()[0]["shape"]).astype(np.float32)
    latency = {name: [] for name in single}
    for block in range(args.blocks + 1):  # the first block warms up and is not counted
        for name, (engine, source, _, _) in single.items():
            for _ in range(args.block_size):
                start = time.perf_counter()
                engine.set_tensor(source, inputs[name])
                engine.invoke()
                if block:
                    latency[name].append(time.perf_counter() - start)
    result = {"files": {}, **describe()}
    for name, times in latency.items():
        ms = np.asarray(times) * 1000
        entry = {"batch1_p50_ms": round(float(np.percentile(ms, 50)), 2),
                 "batch1_p95_ms": round(float(np.percentile(ms, 95)), 2), "calls": len(times)}
        engine, source, _, _ = _interpreter(Path(name), 32)
        if engine.get_input_details()[0]["shape"][0] == 32:
            x = rng.standard_normal(engine.get_input_details()[0]["shape"]).astype(np.float32)
            engine.set_tensor(source, x)
            engine.invoke()
            start, done = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                engine.set_tensor(source, x)
                engine.invoke()
                done += 32
            entry["batch32_images_per_s"] = round(done / (time.perf_counter() - start), 1)
        result["files"][name] = entry
        print(name, entry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--run", type=Path, required=True)
    c.add_argument("--converter", choices=("onnx2tf", "litert-torch"), default="onnx2tf")
    c.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    c.add_argument("--calibration-images", type=int, default=128)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--json")
    t = sub.add_parser("time")
    t.add_argument("files", type=Path, nargs="+")
    t.add_argument("--blocks", type=int, default=8)
    t.add_argument("--block-size", type=int, default=25)
    t.add_argument("--seconds", type=float, default=3.0)
    t.add_argument("--json")
    args = parser.parse_args()
    result = convert(args) if args.what == "convert" else time_files(args)
    save_json(args.json, result)


if __name__ == "__main__":
    main()
