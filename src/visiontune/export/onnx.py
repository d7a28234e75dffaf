"""PyTorch -> ONNX, with everything needed to classify stored inside the file.

The graph takes the normalised N x 3 x S x S float32 tensor (`data.transforms.normalize`) and returns raw
logits (and `unknown_score` beside them when the model carries the open-set score); the batch axis is dynamic.
Labels, preprocessing, calibration, the unknown threshold and the run's metrics go into the model's
metadata_props as JSON, so a lone .onnx file can be loaded by `inference.Classifier`.
"""

from __future__ import annotations

import onnx
import torch
from torch import nn

from visiontune.config import ExportConfig
from visiontune.errors import ModelError
from visiontune.export.metadata import INPUT, OUTPUT
from visiontune.models.onnx_graph import first_line, simplify, trace
from visiontune.models.open_set import OUTPUT as SCORE
from visiontune.models.open_set_head import WithUnknownScore
from visiontune.models.static_pad import with_static_padding


class _Half(nn.Module):
    """fp16 weights and arithmetic inside, float32 in and out, so callers never see the difference."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()
        for module in self.model.modules():
            if getattr(module, "keeps_float32", False):
                module.float()

    def forward(self, x: torch.Tensor):
        out = self.model(x.half())
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def to_onnx(model: nn.Module, input_size: int, *, half: bool = False, opset: int = ExportConfig.opset) -> onnx.ModelProto:
    """Trace `model` (eval mode, CPU) at input_size x input_size to an ONNX graph with a dynamic batch axis."""
    net = with_static_padding(model, input_size)  # a copy: the caller's model is left as it was
    net = _Half(net) if half else net
    net.eval()
    try:
        data = trace(net, torch.zeros(1, 3, input_size, input_size), [INPUT], output_names(model), opset=opset)
    except Exception as exc:  # an operator ONNX cannot express: name it, the user cannot fix it here
        raise ModelError(f"this architecture cannot be exported to ONNX ({first_line(exc)})") from None
    return simplify(data)


def output_names(model: nn.Module) -> list[str]:
    """The graph's outputs: the logits, and the unknown score when the model carries one."""
    return [OUTPUT, SCORE] if isinstance(model, WithUnknownScore) else [OUTPUT]


def serialize(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString()
