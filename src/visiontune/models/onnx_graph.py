"""PyTorch modules as ONNX graphs, and ONNX Runtime sessions over them: shared by training's frozen pass, the
exporter and inference, so every session is made (and every failure worded) the same way."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

from visiontune.config import default_workers
from visiontune.errors import ModelError

OPSET = 17


def session_options(threads: int = 0, spinning: bool = True, level: str = "all"):
    """`spinning=False`: idle intra-op threads sleep instead of busy-waiting for the next call. A server wants
    that: the cores they would burn decode the next requests' images (measured: ~40 % less CPU per image for
    Lite0 INT8 at batch 8 on 2 cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    options.intra_op_num_threads = default_workers(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # ORT's own warnings (unused initialisers, ...) are not the user's business
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(model: str | Path | bytes, where: str, threads: int = 0, *, spinning: bool = True, options=None):
    """An ONNX Runtime CPU session over a file or serialized bytes; a damaged or foreign file is a ModelError."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options or session_options(threads, spinning),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for a damaged or foreign file
        raise ModelError(f"{where}: not a readable ONNX model (truncated or damaged? {first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def trace(module, example, inputs: list[str], outputs: list[str], *, opset: int = OPSET) -> bytes:
    """`module` (eval mode, CPU) traced on the `example` input to serialized ONNX, every axis 0 dynamic.

    Raises the tracer's own exception: callers decide whether an untraceable architecture is an error (export)
    or a slower path (training's frozen pass)."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The tracer warns about Python-level shape arithmetic in timm's "same" padding; the traced constants are
        # right for the fixed input size the model records.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [*inputs, *outputs]}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return buffer.getvalue()


def constant_fold(data: bytes) -> bytes:
    """ONNX Runtime's basic, hardware-independent optimisation pass (constant folding, redundant-node removal,
    Conv+BatchNorm fusion), saved back as a plain ONNX model with the original's opset and graph I/O.

    The tracer leaves constant subgraphs behind (e.g. the chain that reorders F.pad's pads); folded, they are
    the constants later passes and the quantizer can see through."""
    with tempfile.TemporaryDirectory(prefix="visiontune-onnx-") as tmp:
        out = os.path.join(tmp, "folded.onnx")
        options = session_options(level="basic")
        options.optimized_model_filepath = out
        open_session(data, "traced graph", options=options)
        return Path(out).read_bytes()


def simplify(data: bytes):
    """A traced graph, constant-folded and with zero Pads folded into the convolutions after them (onnx.ModelProto)."""
    import onnx

    return fold_pads_into_convs(onnx.load_from_string(constant_fold(data)))


def fold_pads_into_convs(proto):
    """Zero Pad -> Conv becomes one Conv with (asymmetric) pads.

    ONNX Runtime fuses that pair itself in float, but not once INT8 quantization has put Quantize /
    Dequantize nodes between them: five float Pads then stay in the INT8 graph, each with a round trip
    out of and back into integers. Folding them before quantization removes the question.
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    removed = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in inits or pad.output[0] in outputs:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if mode != b"constant":
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = inits.get(pad.input[2])
            if value is None or float(numpy_helper.to_array(value).reshape(-1)[0]) != 0.0:
                continue
        users = consumers.get(pad.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]:
            continue
        conv = users[0]
        p = [int(v) for v in numpy_helper.to_array(inits[pad.input[1]])]
        if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)) or min(p) < 0:
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + p[2], old[1] + p[3], old[2] + p[6], old[3] + p[7]]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, onnx.helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        removed.append(pad)
    for node in removed:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return proto
