"""How much error each quantized node of an INT8 graph adds, measured against its fp32 graph on real images.

The idea of ONNX Runtime's QDQ debugging tools (`onnxruntime.quantization.qdq_loss_debug`: the same tensors read
out of the float and the QDQ model and compared), narrowed to what choosing layers to keep in float needs: for each
quantized node, the relative error of its output against fp32 minus the largest relative error of the activations
it reads, each read after its Q/DQ pair (what the next node sees: a ReLU6 the quantizer removed clips there, so the
tensor means what the fp32 one means). The error a node receives is not its own, and keeping the node in float would not remove
it; what it adds (its weights' and its inputs' rounding) would. Tensors are accumulated a batch at a time, so memory holds
one batch's activations, not every image's.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def quantized_nodes(int8_model: bytes) -> dict[str, tuple[list[str], list[str]]]:
    """{node name: (the float activations it reads through a Q/DQ pair, its outputs)} for every node of the INT8
    graph that computes on quantized values; names are the fp32 (prepared) graph's."""
    import onnx

    graph = onnx.load_from_string(int8_model).graph
    weights = {i.name for i in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    found: dict[str, tuple[list[str], list[str]]] = {}
    for node in graph.node:
        if node.op_type in _QDQ:
            continue
        reads, quantized = [], False
        for name in node.input:
            dq = made_by.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            quantized = True
            q = made_by.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in weights:
                reads.append(q.input[0])
        if quantized and node.name:
            found[node.name] = (reads, list(node.output))
    return found


def sensitivities(fp32_model: bytes, int8_model: bytes, batches: Iterable[np.ndarray], input_name: str,
                  threads: int = 0) -> dict[str, float]:
    """{node name: relative error it adds}, largest first, for every quantized node whose tensors both graphs
    have. `fp32_model` is the graph `int8_model` was quantized from (same tensor names)."""
    nodes = quantized_nodes(int8_model)
    seen = _after_qdq(int8_model)
    tensors = sorted({t for reads, outs in nodes.values() for t in (*reads, *outs)} - {input_name})
    fp32 = _with_outputs(fp32_model, tensors, threads)
    int8 = _with_outputs(int8_model, sorted({seen.get(t, t) for t in tensors}), threads)
    common = [t for t in tensors if t in fp32[1] and seen.get(t, t) in int8[1]]
    noise, signal = dict.fromkeys(common, 0.0), dict.fromkeys(common, 0.0)
    for batch in batches:
        ref = dict(zip(fp32[1], fp32[0].run(fp32[1], {input_name: batch})))
        got = dict(zip(int8[1], int8[0].run(int8[1], {input_name: batch})))
        for t in common:
            a, b = ref[t].astype(np.float64), got[seen.get(t, t)].astype(np.float64)
            if a.shape == b.shape:
                noise[t] += float(np.sum((a - b) ** 2))
                signal[t] += float(np.sum(a * a))
    error = {t: (noise[t] / signal[t]) ** 0.5 if signal[t] > 0 else 0.0 for t in common}
    added = {}
    for name, (reads, outs) in nodes.items():
        out = [error[t] for t in outs if t in error]
        if out:
            added[name] = max(out) - max((error.get(t, 0.0) for t in reads), default=0.0)
    return dict(sorted(added.items(), key=lambda kv: -kv[1]))


def _after_qdq(int8_model: bytes) -> dict[str, str]:
    """{activation: the name of its value after its QuantizeLinear -> DequantizeLinear pair}."""
    import onnx

    graph = onnx.load_from_string(int8_model).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = {}
    for q in graph.node:
        if q.op_type == "QuantizeLinear":
            dq = [n for n in readers.get(q.output[0], []) if n.op_type == "DequantizeLinear"]
            if dq:
                found[q.input[0]] = dq[0].output[0]
    return found


def _with_outputs(model: bytes, tensors: list[str], threads: int):
    """(an ONNX Runtime session that also returns `tensors`, the ones of them the graph has)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load_from_string(model)
    made = {out for node in proto.graph.node for out in node.output}
    present = {o.name for o in proto.graph.output}
    wanted = [t for t in tensors if t in made]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                             for t in wanted if t not in present)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Fusions would hide the very tensors asked for (a QDQ Conv becomes one integer kernel).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, wanted
