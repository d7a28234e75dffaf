"""Fix TensorFlow-style "same" padding to constants before tracing.

timm's `tf_` models (the EfficientNet-Lite weights among them) pad stride-2 convolutions by an amount
computed from the input's height and width at every call. Traced, that becomes ~30 small shape operators
per convolution (Shape, Gather, Div, Ceil, Clip, Pad, ...) that ONNX Runtime runs on every image and
that break its Pad+Conv fusion. The model only ever sees `input_size` x `input_size` (model.json fixes
it), so the padding is known ahead: computed once here, it becomes a constant Pad that ONNX Runtime folds
into the convolution's own (asymmetric) pads. The result is the same numbers, checked by the parity test.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class _StaticSameConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__()
        self.conv = conv
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return nn.Conv2d.forward(self.conv, x)  # the plain convolution (Conv2dSame's own padding is 0)


def with_static_padding(model: nn.Module, input_size: int) -> nn.Module:
    """A copy of `model` whose dynamic "same"-padded convolutions use the padding for this input size."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # a timm without these layers has nothing to fix
        return model
    model = copy.deepcopy(model).eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Conv2dSame):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:]))))
    if not hooks:
        return model
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    for name, (h, w) in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        pads = pad_same_arg([h, w], list(conv.kernel_size), list(conv.stride), list(conv.dilation))
        setattr(parent, child, _StaticSameConv(conv, tuple(int(p) for p in pads)))
    return model
