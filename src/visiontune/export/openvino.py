"""ONNX -> OpenVINO IR (model.openvino.xml + .bin), for x86 servers that run OpenVINO.

The IR is converted from the exporter's own ONNX graph (fp32, or the QDQ INT8 graph, which OpenVINO runs with
its INT8 kernels). The model description, metrics and export record travel in the IR's rt_info as JSON, as they
do in ONNX metadata, so the .xml alone classifies an image. The .bin is put in place before the .xml that names
it, each by an atomic rename: a reader, which opens the .xml, never sees an .xml without its weights.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from visiontune.errors import ModelError
from visiontune.export.metadata import OUTPUT
from visiontune.files import staging_folder
from visiontune.models.bundle import ModelMeta
from visiontune.models.onnx_graph import first_line
from visiontune.models.open_set import OUTPUT as SCORE

RT_KEY = "visiontune"


def convert(onnx_bytes: bytes):
    """An openvino.Model from serialised ONNX."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.onnx"
        source.write_bytes(onnx_bytes)
        return ov.convert_model(str(source))


def compile_ir(model, where: str, threads: int, streams: int = 1):
    """(openvino.Model, batch -> (logits, unknown scores or None)) for an IR path or an openvino.Model, compiled for
    the CPU at fp32 precision: OpenVINO would run an fp32 model in bf16 on CPUs that have it (logits off by 0.1 on
    Lite0); an INT8 IR still runs its INT8 kernels. `streams` calls may run at once (from as many threads), each on
    `threads`."""
    try:
        import openvino as ov
    except ImportError:
        raise ModelError(f"{where}: an OpenVINO model, and OpenVINO is not installed "
                         f"(pip install 'visiontune[openvino]')") from None
    core = ov.Core()
    try:
        model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads * streams, "NUM_STREAMS": streams,
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    except RuntimeError as exc:
        raise ModelError(f"{where}: not a readable OpenVINO model ({first_line(exc)[:200]})") from None
    ports = list(compiled.outputs)
    if not ports or len(compiled.inputs) != 1:  # an .xml with no layers read and compiled without complaint
        raise ModelError(f"{where}: not an image classifier ({len(compiled.inputs)} input(s) and {len(ports)} "
                         f"output(s); a classifier has one image input and its logits as output)")
    named = {name: port for port in ports for name in port.get_names()}
    logits_port = named.get(OUTPUT, ports[0])
    score_port = named.get(SCORE)
    local = threading.local()  # an infer request serves one call at a time: one per calling thread

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        out = request.infer([np.ascontiguousarray(batch, dtype=np.float32)])
        score = None if score_port is None else np.array(out[score_port], dtype=np.float32)
        return np.array(out[logits_port], dtype=np.float32), score

    return model, run


def save(model, target: Path, meta: ModelMeta, metrics: dict, info: dict) -> None:
    """Write `model` as `target` (.xml) and its .bin beside it, weights kept fp32 (OpenVINO would halve them)."""
    import openvino as ov

    for key, value in (("model", meta.to_dict()), ("metrics", metrics), ("export", info)):
        model.set_rt_info(json.dumps(value), [RT_KEY, key])
    with staging_folder(target) as tmp:  # removed even on failure, and after a kill -9 by the next export
        staged = tmp / target.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(staged, target)


def read_rt_info(model, where: str) -> tuple[dict, dict, dict]:
    """(model.json, metrics, export record) stored by `save`; ({}, {}, {}) parts for an IR made elsewhere."""
    out = []
    for key in ("model", "metrics", "export"):
        try:
            text = model.get_rt_info([RT_KEY, key]).astype(str)
        except RuntimeError:  # no such key
            text = "{}"
        out.append(json.loads(text))
    return tuple(out)
