"""GPTQ weight rounding on a small real ONNX graph (a dense 3x3 convolution, then a depthwise one): the integers
change, the scales and the graph do not, and the rounded layers reproduce fp32 closer on the images they were
rounded for. The mechanism only; what it does to a trained model's accuracy is measured in BENCHMARKS.md."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from visiontune.models.onnx_graph import open_session
from visiontune.models.quantize import Int8Calibration


def two_convolutions() -> bytes:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * 0.2
    depthwise = rng.normal(size=(16, 1, 3, 3)).astype(np.float32) * 0.5
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "dense_w"], ["a"], name="dense", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["b"], name="relu"),
         helper.make_node("Conv", ["b", "dw_w"], ["output"], name="depthwise", group=16, pads=[1, 1, 1, 1],
                          strides=[2, 2])],
        "two_convolutions",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 8, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 16, 8, 8])],
        [numpy_helper.from_array(dense, "dense_w"), numpy_helper.from_array(depthwise, "dw_w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def correlated_images(n: int, seed: int) -> np.ndarray:
    """Inputs whose channels move together, as a network's activations do: where GPTQ's rounding pays."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(8, 8))
    return np.einsum("nchw,dc->ndhw", rng.normal(size=(n, 8, 16, 16)), mixing).astype(np.float32)


def weights(model: bytes) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(model).graph.initializer}


def error(model: bytes, reference: np.ndarray, images: np.ndarray) -> float:
    got = open_session(model, "test graph").run(None, {"input": images})[0]
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def test_gptq_changes_only_the_integers_and_reproduces_fp32_closer():
    fp32, images = two_convolutions(), correlated_images(32, seed=1)
    reference = open_session(fp32, "fp32").run(None, {"input": images})[0]
    built = {}
    for rounding in ("nearest", "gptq"):
        with Int8Calibration(fp32, [images], input_name="input", method="minmax",
                             weight_rounding=rounding) as calibrated:
            built[rounding] = calibrated.build()
    nearest, gptq = weights(built["nearest"]), weights(built["gptq"])
    assert nearest.keys() == gptq.keys()
    integers = [name for name, w in gptq.items() if w.dtype == np.int8 and w.ndim == 4]
    assert len(integers) == 2  # both convolutions' weights
    for name in integers:
        assert gptq[name].min() >= -127 and not np.array_equal(gptq[name], nearest[name])
    for name in set(gptq) - set(integers):  # scales, zero points, activations' ranges: as ONNX Runtime set them
        np.testing.assert_array_equal(gptq[name], nearest[name])
    assert [n.op_type for n in onnx.load_from_string(built["gptq"]).graph.node] == \
        [n.op_type for n in onnx.load_from_string(built["nearest"]).graph.node]
    assert error(built["gptq"], reference, images) < error(built["nearest"], reference, images)


def test_a_node_kept_in_float_keeps_its_float_weights_under_gptq():
    fp32, images = two_convolutions(), correlated_images(8, seed=2)
    with Int8Calibration(fp32, [images], input_name="input", method="minmax") as calibrated:
        graph = onnx.load_from_string(calibrated.build(["depthwise"])).graph
    node = next(n for n in graph.node if n.name == "depthwise")
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    np.testing.assert_array_equal(stored[node.input[1]], weights(fp32)["dw_w"])
