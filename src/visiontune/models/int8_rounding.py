"""Rounding INT8 convolution weights to what their layer's output needs, not to the nearest integer (GPTQ).

Nearest rounding treats each weight alone; a convolution's output is a sum of weights times inputs, so rounding
errors add up along the input directions the data actually uses. GPTQ (Frantar et al., 2023, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", after Optimal Brain Quantization) rounds one
input column at a time and pushes each column's error onto the columns not yet rounded, weighted by the inverse
of the inputs' second moments H = E[x xᵀ] measured on calibration images. The scales and zero points ONNX
Runtime chose stay as they are, so the INT8 graph, its kernels and its speed do not change: only which integers
the weights hold. On EfficientNet-Lite the per-channel nearest rounding was most of the INT8 graph's error (every
weight back in float, activations still uint8, passes the parity gate that the all-INT8 graph misses).

Supported: ONNX `Conv` nodes, dense (group 1) or depthwise (one input channel a group), whose weight is an int8
initializer read through a per-output-channel `DequantizeLinear` with zero point 0, as `quantize_static` writes
them. Others keep ONNX Runtime's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

_DAMPING = 0.01  # of H's mean diagonal: GPTQ's default, keeps the inverse of a nearly singular H stable
_BLOCK = 128  # columns rounded before their error is pushed to the rest in one matrix product
# Output positions an image contributes to a layer's H, at most: the early layers' 112 x 112 add cost, not
# information (H is at most 25 x 25 per channel there).
_POSITIONS = 1024
MOMENT_BATCH = 16  # images whose patches go into one matrix product when H is accumulated


@dataclass
class _Layer:
    input: str  # the fp32 tensor the convolution reads
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    depthwise: bool
    weight: np.ndarray  # the fp32 graph's (BatchNorm folded) weights, which the INT8 ones approximate
    moments: np.ndarray | None = None  # H: (d, d) dense, (channels, k*k, k*k) depthwise
    count: int = 0


class InputMoments:
    """The second moments of every supported convolution's input over calibration images, measured on the fp32
    (prepared) graph so that any INT8 graph built from it can be re-rounded. `add` takes the inputs a pass over the
    images computed anyway (the calibration's); `measure` runs a pass of its own."""

    def __init__(self, prepared: bytes):
        import onnx

        graph = onnx.load_from_string(prepared).graph
        weights = {i.name: i for i in graph.initializer}
        self.layers: dict[str, _Layer] = {}
        for node in graph.node:
            layer = _layer(node, weights)
            if layer is not None:
                self.layers[node.name] = layer

    @property
    def inputs(self) -> set[str]:
        """The tensors `add` needs."""
        return {layer.input for layer in self.layers.values()}

    def add(self, values: dict[str, np.ndarray]) -> None:
        """Accumulate a batch: `values` maps tensor names to their values on the same images."""
        for layer in self.layers.values():
            if layer.input in values:
                _accumulate(layer, values[layer.input])

    def done(self) -> InputMoments:
        """Forget the layers no batch reached."""
        self.layers = {name: layer for name, layer in self.layers.items() if layer.count}
        return self

    @classmethod
    def measure(cls, prepared: bytes, batches: Iterable[np.ndarray], input_name: str,
                threads: int = 0) -> InputMoments:
        from visiontune.models.int8_sensitivity import _with_outputs

        moments = cls(prepared)
        session, wanted = _with_outputs(prepared, sorted(moments.inputs), threads)
        for batch in batches:
            moments.add({input_name: batch, **dict(zip(wanted, session.run(wanted, {input_name: batch})))})
        return moments.done()


def round_weights(int8, moments: InputMoments, skip: Iterable[str] = ()) -> int:
    """Re-round, in place, the int8 weights of the INT8 graph (`onnx.ModelProto`) whose convolutions `moments`
    measured, from the prepared graph's float weights; returns how many layers were re-rounded. `skip`: nodes kept
    in float (their weights are no longer quantized)."""
    from onnx import numpy_helper

    skip = set(skip)
    done = 0
    for node, q_init, q, scale in _quantized_conv_weights(int8.graph):
        layer = moments.layers.get(node.name)
        if layer is None or node.name in skip or layer.weight.shape != q.shape:
            continue
        low = -127 if q.min() >= -127 else -128  # ONNX Runtime's symmetric weights never use -128
        rounded = _gptq(layer.weight.astype(np.float64), scale, layer, low)
        q_init.CopyFrom(numpy_helper.from_array(rounded.astype(np.int8).reshape(q.shape), q_init.name))
        done += 1
    return done


def on_int8_grid(fp32_model: bytes, int8_model: bytes) -> bytes:
    """`fp32_model` with each convolution weight that `int8_model` (made from it) holds as per-channel int8
    replaced by its dequantized value, integer x scale: a quantizer that rounds each output channel on max|w| / 127,
    as TFLite's does, then lands on (nearly) the same integers, so GPTQ's rounding carries over to it. Weights that
    stayed float, or whose name or shape differ, are left as they are."""
    import onnx
    from onnx import numpy_helper

    dequantized = {q_init.name.removesuffix("_quantized"): q * scale.reshape(-1, 1, 1, 1)
                   for _, q_init, q, scale in _quantized_conv_weights(onnx.load_from_string(int8_model).graph)}
    fp32 = onnx.load_from_string(fp32_model)
    for tensor in fp32.graph.initializer:
        weight = dequantized.get(tensor.name)
        if weight is not None and tuple(tensor.dims) == weight.shape:
            tensor.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), tensor.name))
    return fp32.SerializeToString()


def _quantized_conv_weights(graph):
    """(Conv node, its int8 weight initializer, the integers, the per-output-channel scales as float64) of every
    convolution of an INT8 graph whose weight is read through a DequantizeLinear with zero point 0."""
    from onnx import TensorProto, numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        dq = made_by.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q_init, scale_init = initializers.get(dq.input[0]), initializers.get(dq.input[1])
        zero = initializers.get(dq.input[2]) if len(dq.input) > 2 else None
        if q_init is None or scale_init is None or q_init.data_type != TensorProto.INT8:
            continue
        q = numpy_helper.to_array(q_init)
        scale = numpy_helper.to_array(scale_init).astype(np.float64).reshape(-1)
        if scale.size != q.shape[0] or (zero is not None and np.any(numpy_helper.to_array(zero))):
            continue
        yield node, q_init, q, scale


def _layer(node, weights) -> _Layer | None:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
        return None
    from onnx import numpy_helper

    weight = numpy_helper.to_array(weights[node.input[1]])
    shape = list(weight.shape)
    if len(shape) != 4:
        return None
    attrs = {a.name: a for a in node.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    if attrs.get("auto_pad") is not None and attrs["auto_pad"].s not in (b"", b"NOTSET"):
        return None
    depthwise = group > 1 and shape[1] == 1 and group == shape[0]
    if group != 1 and not depthwise:
        return None
    ints = lambda key, default: tuple(attrs[key].ints) if key in attrs else default  # noqa: E731
    return _Layer(input=node.input[0], kernel=(shape[2], shape[3]), strides=ints("strides", (1, 1)),
                  pads=ints("pads", (0, 0, 0, 0)), dilations=ints("dilations", (1, 1)), depthwise=depthwise,
                  weight=weight)


def _accumulate(layer: _Layer, x: np.ndarray) -> None:
    """Add a batch's patches (what each output position multiplies by the weights) to the layer's H."""
    import torch

    # float32 products (BLAS), float64 sums across batches: H only needs to be good to the 1 % damping GPTQ adds.
    if layer.depthwise:
        p = _patches(layer, x)  # (C, taps, N * positions): one H per channel
        h = torch.bmm(p, p.transpose(1, 2)).double().numpy()
    else:
        p = _patches(layer, x)
        p = p.reshape(-1, p.shape[-1])  # (C * taps, N * positions): one H for the layer
        h = (p @ p.T).double().numpy()
    positions = p.shape[-1]
    layer.moments = h if layer.moments is None else layer.moments + h
    layer.count += positions


def _patches(layer: _Layer, x: np.ndarray):
    """The input values under each kernel tap at the output positions of a regular grid (every position, or every
    step-th row and column when there are more than _POSITIONS), as (C, taps, N * positions), taps in the
    weights' (row, column) order. Strided views, so only the positions kept are copied, once."""
    import math

    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    top, left, bottom, right = layer.pads
    if any(layer.pads):
        x = F.pad(x, (left, right, top, bottom))
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    step = max(1, math.ceil(math.sqrt(windows.shape[2] * windows.shape[3] / _POSITIONS)))
    kept = windows[:, :, ::step, ::step]  # (N, C, rows, columns, kh, kw)
    return kept.permute(1, 4, 5, 0, 2, 3).reshape(kept.shape[1], kh * kw, -1)


def _gptq(weight: np.ndarray, scale: np.ndarray, layer: _Layer, low: int) -> np.ndarray:
    """The integer weights (same shape as `weight`) GPTQ rounds to on the fixed per-output-channel `scale`."""
    h = layer.moments / layer.count
    if layer.depthwise:
        w = weight.reshape(weight.shape[0], -1).copy()  # (channels, k*k), one H each
        inverse = _upper_inverse_cholesky(h)
        q = np.empty_like(w)
        for j in range(w.shape[1]):
            q[:, j] = np.clip(np.round(w[:, j] / scale), low, 127)
            error = (w[:, j] - q[:, j] * scale) / inverse[:, j, j]
            w[:, j + 1:] -= error[:, None] * inverse[:, j, j + 1:]
        return q
    w = weight.reshape(weight.shape[0], -1).copy()  # (out, in*k*k): one H shared by every output channel
    order = np.argsort(-np.diag(h))  # the columns the inputs use most first ("act order")
    w, h = w[:, order], h[np.ix_(order, order)]
    inverse = _upper_inverse_cholesky(h[None])[0]
    q = np.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, _BLOCK):
        end = min(start + _BLOCK, columns)
        errors = np.empty((w.shape[0], end - start))
        for j in range(start, end):
            q[:, j] = np.clip(np.round(w[:, j] / scale), low, 127)
            error = (w[:, j] - q[:, j] * scale) / inverse[j, j]
            w[:, j + 1:end] -= error[:, None] * inverse[j, j + 1:end]
            errors[:, j - start] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    unordered = np.empty_like(q)
    unordered[:, order] = q
    return unordered


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """For each (d, d) H of the batch: the upper Cholesky factor of (H + damping)⁻¹, as GPTQ uses it. Inputs that
    never vary (zero diagonal) get 1 so the inverse exists; their weights' rounding does not matter."""
    h = h.copy()
    index = np.arange(h.shape[1])
    diagonal = h[:, index, index]
    diagonal[diagonal == 0] = 1.0
    h[:, index, index] = diagonal + _DAMPING * diagonal.mean(axis=1, keepdims=True)
    inverse = np.linalg.inv(np.linalg.cholesky(h))  # L⁻¹, with H = L Lᵀ
    inverse_h = np.swapaxes(inverse, 1, 2) @ inverse  # H⁻¹ = L⁻ᵀ L⁻¹
    return np.swapaxes(np.linalg.cholesky(inverse_h), 1, 2)

