"""PyTorch -> ONNX, with everything needed to classify stored inside the file.

The graph takes the normalised N x 3 x S x S float32 tensor (`data.transforms.normalize`) and returns raw
logits; the batch axis is dynamic. Labels, preprocessing, calibration and the run's metrics go into the
model's metadata_props as JSON, so a lone .onnx file can be loaded by `inference.Classifier`.
"""

from __future__ import annotations

import onnx
import torch
from torch import nn

from visiontune.config import ExportConfig
from visiontune.errors import ModelError
from visiontune.export.metadata import INPUT, OUTPUT
from visiontune.models.onnx_graph import constant_fold, first_line, trace


class _Half(nn.Module):
    """fp16 weights and arithmetic inside, float32 in and out, so callers never see the difference."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def to_onnx(model: nn.Module, input_size: int, *, half: bool = False, opset: int = ExportConfig.opset) -> onnx.ModelProto:
    """Trace `model` (eval mode, CPU) at input_size x input_size to an ONNX graph with a dynamic batch axis."""
    from visiontune.export.static_pad import with_static_padding

    net = with_static_padding(model, input_size)  # a copy: the caller's model is left as it was
    net = _Half(net) if half else net
    net.eval()
    try:
        data = trace(net, input_size, [INPUT], [OUTPUT], opset=opset)
    except Exception as exc:  # an operator ONNX cannot express: name it, the user cannot fix it here
        raise ModelError(f"this architecture cannot be exported to ONNX ({first_line(exc)})") from None
    return fold_pads_into_convs(onnx.load_from_string(constant_fold(data)))


def fold_pads_into_convs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Zero Pad -> Conv becomes one Conv with (asymmetric) pads.

    ONNX Runtime fuses that pair itself in float, but not once INT8 quantization has put Quantize /
    Dequantize nodes between them: five float Pads then stay in the INT8 graph, each with a round trip
    out of and back into integers. Folding them before quantization removes the question.
    """
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


def serialize(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString()
