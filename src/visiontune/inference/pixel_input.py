"""ONNX graphs that take the uint8 crops themselves: the model's normalisation as the first nodes of its graph.

Why: normalising in numpy costs 0.5-1 ms an image in the thread that calls the model (a server's model thread
spent 16 % of its time there, BENCHMARKS "INT8 on the version-2 runs"); ONNX Runtime does it in 0.1 ms. The same
float32 arithmetic: transpose to N x 3 x S x S, subtract mean x 255, divide by std x 255, each step exactly
rounded as numpy's are, so the model sees the same bits (tests/test_inference.py checks it) and every ONNX path
(predict, evaluate, serve, bench, ensembles) keeps the answers it had.

Only the session's graph changes: an exported .onnx file keeps its float N x 3 x S x S input for other tools.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visiontune.data.transforms import Preprocess

PIXELS = "pixels"  # the wrapped graph's input: N x S x S x 3 uint8 crops


def load_proto(model: str | Path | bytes):
    """The onnx.ModelProto of a file or serialized bytes; None when the onnx package cannot read it (the session
    that opens it next words the error)."""
    import onnx

    try:
        return onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    except Exception:  # a damaged or foreign file: open_session says what is wrong with it
        return None


def custom_metadata(proto) -> dict[str, str]:
    """The metadata map ONNX Runtime would hand over for this graph."""
    return {p.key: p.value for p in proto.metadata_props}


def with_pixel_input(proto, spec: Preprocess) -> bytes | None:
    """`proto` (changed in place) taking uint8 N x S x S x 3 crops, serialized; None when its input is not the one
    float32 N x 3 x S x S image tensor this needs (a graph made elsewhere is run as it is), or when the channels
    have different means or stds (normalised in numpy, faster there: see below)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1 or not _is_float_image(inputs[0], spec.input_size):
        return None
    image = inputs[0].name
    mean = np.asarray(spec.mean, dtype=np.float32) * np.float32(255.0)
    std = np.asarray(spec.std, dtype=np.float32) * np.float32(255.0)
    if len(set(mean.tolist())) != 1 or len(set(std.tolist())) != 1:
        # ONNX Runtime moves these nodes behind its own transpose to channels-last, where a per-channel constant
        # broadcasts over an innermost axis of 3 element by element: measured 1 ms an image slower than numpy on
        # Lite0 INT8, against 0.1 ms for one value for every channel (EfficientNet-Lite's 0.5, as scalars).
        return None
    # The constants exactly as `transforms.normalize` computes them (float32 mean times 255 in float32).
    mean, std = mean[:1].reshape(()), std[:1].reshape(())
    taken = {name for node in graph.node for name in [*node.input, *node.output]} | initialisers
    if PIXELS in taken:
        return None
    names = _fresh(taken, "pixels_chw", "pixels_float", "pixels_centred", "pixels_mean", "pixels_std")
    chw, as_float, centred, mean_name, std_name = names
    graph.initializer.extend([numpy_helper.from_array(mean, mean_name), numpy_helper.from_array(std, std_name)])
    front = [helper.make_node("Transpose", [PIXELS], [chw], perm=[0, 3, 1, 2]),
             helper.make_node("Cast", [chw], [as_float], to=TensorProto.FLOAT),
             helper.make_node("Sub", [as_float, mean_name], [centred]),
             helper.make_node("Div", [centred, std_name], [image])]
    for node in reversed(front):
        graph.node.insert(0, node)
    batch = inputs[0].type.tensor_type.shape.dim[0]
    size = spec.input_size
    pixels = helper.make_tensor_value_info(PIXELS, TensorProto.UINT8,
                                           [batch.dim_param or batch.dim_value or "batch", size, size, 3])
    position = list(graph.input).index(inputs[0])
    graph.input.remove(inputs[0])
    graph.input.insert(position, pixels)
    return proto.SerializeToString()


def _is_float_image(value, size: int) -> bool:
    from onnx import TensorProto

    kind = value.type.tensor_type
    if kind.elem_type != TensorProto.FLOAT or len(kind.shape.dim) != 4:
        return False
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim[1:]]
    return all(v in (None, want) for v, want in zip(fixed, (3, size, size)))


def _fresh(taken: set[str], *wanted: str) -> list[str]:
    """`wanted` names, each suffixed until no node, input or initialiser of the graph uses it."""
    out = []
    for name in wanted:
        candidate, n = name, 0
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        out.append(candidate)
    return out
